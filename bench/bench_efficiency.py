"""Efficiency of every compared model in one run (issue #5 §5): training time per epoch, inference latency per user
for the next-item top-10 at batch 1 and 256, and peak memory, at max_len 200 on ML-1M and on synthetic histories of
length 1,000 and 2,000. Ratios are against the SASRec baseline of the same run.

    python bench/bench_efficiency.py --data-root ../shared/data --out docs/bench_efficiency.json

Models: M2Rec (the full model: causal FFT, gate, 1024-d text buffer as with bge-large), plain Mamba (M2Rec with FFT
and text off, the Mamba4Rec stand-in) and SASRec (2 layers, 2 heads, the comparison model of bench/sasrec.py), all
of width 64. Training: one epoch of every ML-1M user at every position (batch 256, AdamW, full-catalogue softmax);
at L = 1,000 and 2,000 the same number of tokens (256·200 per step, 24 steps) of random histories over the ML-1M
catalogue. Inference: `model.recommend(histories, k=10)` in eval mode; latency per user = time per call / batch.
Memory: peak growth of resident memory during one training step and one inference call of batch 256, each after a
warm-up call, measured in a child process per model and length whose allocator returns every block above 1 MiB to the
OS (the method of bench/bench_scan.py); the timings come from the parent, with the default allocator.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_scan import warm_peak_memory_mb  # noqa: E402
from bench.sasrec import SASRec, SASRecConfig  # noqa: E402
from m2rec import M2RecConfig, M2RecForSequentialRecommendation  # noqa: E402
from m2rec.training.data import DataArguments, TrainDataset, collate_train, prepare_dataset  # noqa: E402

TOKENS_PER_STEP = 256 * 200
MODELS = ("SASRec", "M2Rec", "Mamba (M2Rec w/o FFT, text)")
STEPS_SYNTHETIC = 24  # an ML-1M epoch at batch 256 is 24 steps


def build(name, num_items, max_len):
    if name == "SASRec":
        return SASRec(SASRecConfig(num_items=num_items, max_len=max_len, num_hidden_layers=2))
    options = {"M2Rec": {}, "Mamba (M2Rec w/o FFT, text)": {"fft_mode": "none", "fusion": "none"}}[name]
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=num_items, max_len=max_len, **options))
    if model.config.fusion != "none":
        text = torch.randn(num_items + 1, model.config.text_embedding_dim)
        text[0] = 0
        model.set_text_embeddings(text)
    return model


def recommend(model, histories):
    if isinstance(model, M2RecForSequentialRecommendation):
        return model.recommend(histories, k=10)
    with torch.no_grad():
        return model(histories, last_position_only=True).logits.topk(10)


def training_batches(data, length, batch_size, generator):
    """ML-1M's own training batches at L = 200; random histories of the same tokens per step beyond."""
    if length == 200:
        loader = torch.utils.data.DataLoader(TrainDataset(data, 200), batch_size=batch_size, shuffle=True,
                                             collate_fn=collate_train, generator=generator)
        return [(b["input_ids"], b["labels"]) for b in loader]
    batch = TOKENS_PER_STEP // length
    ids = torch.randint(1, data.num_items + 1, (STEPS_SYNTHETIC, batch, length + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in ids]


def train_step(model, input_ids, labels):
    """Forward and backward of one batch, gradients allocated afresh as after the trainer's zero_grad()."""
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=labels, return_logits=False).loss.backward()


def train_epoch_seconds(model, batches):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for input_ids, labels in batches:
        model(input_ids, labels=labels, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def latency_per_user(model, histories, repeats):
    model.eval()
    recommend(model, histories)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        recommend(model, histories)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(histories)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    data = prepare_dataset(DataArguments(format="sequence", data_path=f"{args.data_root}/ml-1m/ml-1m_seq_5core.txt.gz",
                                         item_path=f"{args.data_root}/ml-1m/movies.dat", max_len=200))
    test_inputs = [history[-200:] for history, _ in data.eval_examples("test")]

    results = []
    for length in args.lengths:
        generator = torch.Generator().manual_seed(0)
        if length == 200:  # real ML-1M test histories, right-padded
            chosen = torch.randperm(len(test_inputs), generator=generator)[:256].tolist()
            histories = collate_train([{"input_ids": test_inputs[i], "labels": test_inputs[i]} for i in chosen])
            histories = histories["input_ids"]
        else:
            histories = torch.randint(1, data.num_items + 1, (256, length), generator=generator)
        batches = training_batches(data, length, 256, generator)
        for name in args.models:
            torch.manual_seed(0)
            model = build(name, data.num_items, max(length, 200))
            row = {"model": name, "length": length}
            if args.memory_child:
                input_ids, labels = batches[0]
                model.train()
                row["train_step_peak_mb"] = warm_peak_memory_mb(lambda: train_step(model, input_ids, labels))
                model.eval()
                row["inference_peak_mb"] = warm_peak_memory_mb(lambda: recommend(model, histories))
                print(json.dumps(row), flush=True)
                continue
            row.update(epoch_seconds=train_epoch_seconds(model, batches),
                       latency_ms_batch1=1e3 * latency_per_user(model, histories[:1], repeats=20),
                       latency_ms_batch256=1e3 * latency_per_user(model, histories, repeats=3))
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.memory_child:
        return
    # After the timings, so that the two never share the cores.
    for row in results:
        command = [sys.executable, __file__, "--memory-child", "--data-root", args.data_root,
                   "--lengths", str(row["length"]), "--models", row["model"]]
        child = subprocess.run(command, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}, check=True,
                               stdout=subprocess.PIPE, text=True)
        peaks = json.loads(child.stdout)
        row.update(train_step_peak_mb=peaks["train_step_peak_mb"], inference_peak_mb=peaks["inference_peak_mb"])

    print("\n| model | L | epoch s | ×SASRec | latency/user ms, batch 1 | ×SASRec | latency/user ms, batch 256 | ×SASRec "
          "| train-step peak MB | ×SASRec | inference peak MB | ×SASRec |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|---:|")
    for row in results:
        base = next(r for r in results if r["length"] == row["length"] and r["model"] == "SASRec")
        cells = []
        for key, digits in (("epoch_seconds", 1), ("latency_ms_batch1", 2), ("latency_ms_batch256", 3),
                            ("train_step_peak_mb", 0), ("inference_peak_mb", 0)):
            cells += [f"{row[key]:,.{digits}f}", f"{row[key] / base[key]:.2f}"]
        print(f"| {row['model']} | {row['length']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
