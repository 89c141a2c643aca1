"""Efficiency of every compared model in one run (issue #5 §5): training time per epoch, inference latency per user
for the next-item top-10 at batch 1 and 256, and peak memory, at max_len 200 on ML-1M and on synthetic histories of
length 1,000 and 2,000. Ratios are against the SASRec baseline of the same run.

    python bench/bench_efficiency.py --data-root ../shared/data --out docs/bench_efficiency.json
    python bench/bench_efficiency.py --smoke    # tiny synthetic data, no memory children: checks that it runs
    python bench/bench_efficiency.py --lengths 200 --train-batch-size 64    # the shipped ML-1M recipe's epoch

Models: M2Rec (the full model: causal FFT, gate, 1024-d text buffer as with bge-large), plain Mamba (M2Rec with FFT
and text off, the Mamba4Rec stand-in) and SASRec (2 layers, 2 heads, the comparison model of bench/sasrec.py), all
of width 64. Training: one epoch of every ML-1M user at every position (batch 256, AdamW, full-catalogue softmax);
at L = 1,000 and 2,000 the same number of tokens (256·200 per step, 24 steps) of random histories over the ML-1M
catalogue. `--train-batch-size` sets the sequences per training step (the same tokens per epoch at every length;
the shipped ML-1M config trains at 64). Inference: `model.recommend(histories, k=10)` in eval mode; latency per user = time per call / batch.
The models of one length are timed in interleaved rounds (bench/timing.py), so that the machine's drift over minutes
does not enter the ratios: training in 5 rounds, round r training every model in turn on the epoch's steps r,
r + 5, r + 10, ... (the epoch time is the sum of the rounds, the ratio the median of the per-round ratios with its
range); inference in 5 rounds of `recommend` calls (latency the median over the rounds).
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
from bench.timing import ROUNDS, interleaved_seconds, ratio  # noqa: E402
from m2rec import M2RecConfig, M2RecForSequentialRecommendation  # noqa: E402
from m2rec.training.data import DataArguments, TrainDataset, collate_train, prepare_dataset  # noqa: E402

BATCH = 256
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


def training_batches(data, length, batch_size, generator, steps=STEPS_SYNTHETIC):
    """ML-1M's own training batches at L = 200; `steps` batches of random histories of the same tokens per step
    beyond."""
    if length == 200:
        loader = torch.utils.data.DataLoader(TrainDataset(data, 200), batch_size=batch_size, shuffle=True,
                                             collate_fn=collate_train, generator=generator)
        return [(b["input_ids"], b["labels"]) for b in loader]
    batch = batch_size * 200 // length
    ids = torch.randint(1, data.num_items + 1, (steps, batch, length + 1), generator=generator)
    return [(step[:, :-1], step[:, 1:]) for step in ids]


def train_step(model, input_ids, labels):
    """Forward and backward of one batch, gradients allocated afresh as after the trainer's zero_grad()."""
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=labels, return_logits=False).loss.backward()


def train_seconds(model, optimizer, batches):
    """Seconds to train on `batches`, one AdamW step each."""
    model.train()
    start = time.perf_counter()
    for input_ids, labels in batches:
        model(input_ids, labels=labels, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def interleaved_epoch(models, batches, rounds):
    """{name: [seconds of each round]}: the epoch's batches dealt into `rounds` slices (round r trains batches r,
    r + rounds, ...: every slice a like mix of the epoch), each slice trained by every model in turn before the
    next."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in models.items()}
    seconds = {name: [] for name in models}
    for batch_slice in (batches[r::rounds] for r in range(rounds)):
        for name, model in models.items():
            seconds[name].append(train_seconds(model, optimizers[name], batch_slice))
    return seconds


def interleaved_latency(models, histories, rounds):
    """{name: [seconds per user in each round]} of `recommend` on the (B, L) histories, the models in turn."""
    for model in models.values():
        model.eval()
    calls = {name: (lambda model=model: recommend(model, histories)) for name, model in models.items()}
    return {name: [t / len(histories) for t in times]
            for name, times in interleaved_seconds(calls, rounds=rounds).items()}


def evaluation_histories(data, length, batch, generator):
    """(batch, length) histories to score: real ML-1M test histories, right-padded, at L = 200; random ones beyond."""
    if length != 200:
        return torch.randint(1, data.num_items + 1, (batch, length), generator=generator)
    test_inputs = [history[-200:] for history, _ in data.eval_examples("test")]
    chosen = torch.randperm(len(test_inputs), generator=generator)[:batch].tolist()
    return collate_train([{"input_ids": test_inputs[i], "labels": test_inputs[i]} for i in chosen])["input_ids"]


COLUMNS = (("epoch s, batch {train_batch}", "epoch_seconds", 1), ("latency/user ms, batch 1", "latency_ms_batch1", 2),
           ("latency/user ms, batch {batch}", "latency_ms_batch", 3), ("train-step peak MB", "train_step_peak_mb", 0),
           ("inference peak MB", "inference_peak_mb", 0))
# The timed columns' per-round lists, from which their ratios to SASRec come.
ROUND_KEYS = {"epoch_seconds": "epoch_rounds", "latency_ms_batch1": "latency_rounds_batch1",
              "latency_ms_batch": "latency_rounds_batch"}


def markdown(results):
    titles = [title.format(batch=results[0]["batch"], train_batch=results[0]["train_batch"]) for title, _, _ in COLUMNS]
    lines = ["| model | L | " + " | ".join(f"{title} | ×SASRec" for title in titles) + " |",
             "|---|---:|" + "---:|---:|" * len(COLUMNS)]
    for row in results:
        base = next(r for r in results if r["length"] == row["length"] and r["model"] == "SASRec")
        cells = []
        for _, key, digits in COLUMNS:
            if row.get(key) is None:
                cells += ["-", "-"]
                continue
            relative = (ratio(row[ROUND_KEYS[key]], base[ROUND_KEYS[key]]) if key in ROUND_KEYS
                        else f"{row[key] / base[key]:.2f}")
            cells += [f"{row[key]:,.{digits}f}", str(relative)]
        lines.append(f"| {row['model']} | {row['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--train-batch-size", type=int, help=f"sequences per training step (default {BATCH})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny synthetic data and batches, no memory children: checks that the script runs")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.smoke:
        data_args = DataArguments(format="synthetic", synthetic_users=40, synthetic_items=30, max_len=200,
                                  cache_dir=None)
        args.lengths, args.rounds, batch, steps = [100], 2, 4, 2
    else:
        data_args = DataArguments(format="sequence", data_path=f"{args.data_root}/ml-1m/ml-1m_seq_5core.txt.gz",
                                  item_path=f"{args.data_root}/ml-1m/movies.dat", max_len=200)
        batch, steps = BATCH, STEPS_SYNTHETIC
    train_batch = args.train_batch_size or batch
    steps = max(1, steps * batch // train_batch)  # the same tokens per synthetic epoch at any training batch
    data = prepare_dataset(data_args)

    results = []
    for length in args.lengths:
        generator = torch.Generator().manual_seed(0)
        histories = evaluation_histories(data, length, batch, generator)
        batches = training_batches(data, length, train_batch, generator, steps)
        models = {}
        for name in args.models:
            torch.manual_seed(0)
            models[name] = build(name, data.num_items, max(length, 200))
        if args.memory_child:
            for name, model in models.items():
                input_ids, labels = batches[0]
                model.train()
                row = {"model": name, "length": length,
                       "train_step_peak_mb": warm_peak_memory_mb(lambda: train_step(model, input_ids, labels))}
                model.eval()
                row["inference_peak_mb"] = warm_peak_memory_mb(lambda: recommend(model, histories))
                print(json.dumps(row), flush=True)
            continue
        epoch = interleaved_epoch(models, batches, args.rounds)
        latency_batch1 = interleaved_latency(models, histories[:1], args.rounds)
        latency_batch = interleaved_latency(models, histories, args.rounds)
        for name in models:
            results.append({"model": name, "length": length, "batch": batch, "train_batch": train_batch,
                            "epoch_seconds": sum(epoch[name]), "epoch_rounds": epoch[name],
                            "latency_ms_batch1": 1e3 * statistics.median(latency_batch1[name]),
                            "latency_rounds_batch1": latency_batch1[name],
                            "latency_ms_batch": 1e3 * statistics.median(latency_batch[name]),
                            "latency_rounds_batch": latency_batch[name]})
            print(json.dumps(results[-1]), flush=True)
    if args.memory_child:
        return
    # After the timings, so that the two never share the cores.
    for row in results if not args.smoke else []:
        command = [sys.executable, __file__, "--memory-child", "--data-root", args.data_root,
                   "--lengths", str(row["length"]), "--models", row["model"], "--train-batch-size", str(train_batch)]
        child = subprocess.run(command, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}, check=True,
                               stdout=subprocess.PIPE, text=True)
        peaks = json.loads(child.stdout)
        row.update(train_step_peak_mb=peaks["train_step_peak_mb"], inference_peak_mb=peaks["inference_peak_mb"])

    table = markdown(results)
    print("\n" + table)
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "rounds": args.rounds, "results": results}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
