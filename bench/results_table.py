"""Markdown tables from the rows `bench/reproduce.py` appends to <runs-root>/results.jsonl.

    python bench/results_table.py runs/repro/results.jsonl

One table per dataset: test HR/NDCG/MRR@10 of each experiment, its delta against the full model (`m2rec`) under the
same protocol, the best epoch, the total training time summed from the run's metrics.jsonl, and under it every row's
exact command, seed, machine and text encoder. Where an experiment also ran with the second seed (`<variant>-seed2`),
a second table gives both seeds' test NDCG@10, their mean and their spread (max − min). Rows of
`--exclude-history-eval` ("+exclude-history-eval") re-rank a finished run with seen items removed; they train
nothing. The latest row of an experiment wins.
"""

import json
import sys
from pathlib import Path

METRICS = ("HR@10", "NDCG@10", "MRR@10")


def training_seconds(config: dict) -> float:
    """Train + evaluation time of every epoch of the run (a resumed run's epochs included)."""
    path = Path(config["output_dir"]) / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return sum(r["train_seconds"] + r["eval_seconds"] for r in records)


def second_seed(variant: str) -> str:
    """The experiment that reruns `variant` with the second seed: m2rec+exclude-history-eval →
    m2rec-seed2+exclude-history-eval."""
    name, plus, protocol = variant.partition("+")
    return f"{name}-seed2{plus}{protocol}"


def main(path: str) -> None:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line:
            row = json.loads(line)
            rows[row["experiment"]] = row
    datasets = sorted({name.split("/")[0] for name in rows})
    for dataset in datasets:
        runs = {name.split("/")[1]: row for name, row in rows.items() if name.startswith(dataset + "/")}
        print(f"\n### {dataset}\n")
        print("| experiment | " + " | ".join(f"test {m}" for m in METRICS)
              + " | Δ NDCG@10 vs m2rec (same protocol) | best epoch | training time |")
        print("|---|" + "---:|" * (len(METRICS) + 3))
        for variant, row in runs.items():
            test = row["test"]
            evaluation_only = row.get("evaluation_only", False)
            baseline = runs.get("m2rec+exclude-history-eval" if evaluation_only else "m2rec")
            delta = "" if baseline is None else f"{test['NDCG@10'] - baseline['test']['NDCG@10']:+.4f}"
            cost = "(re-ranking only)" if evaluation_only else f"{training_seconds(row['config']) / 60:.0f} min"
            print(f"| {variant} | " + " | ".join(f"{test[m]:.4f}" for m in METRICS)
                  + f" | {delta} | {row['best_epoch']} | {cost} |")
        seeded = [(variant, row, runs[second_seed(variant)]) for variant, row in runs.items()
                  if second_seed(variant) in runs]
        if seeded:
            print("\n| experiment | test NDCG@10, seed 42 | seed 43 | mean | spread |\n|---|---:|---:|---:|---:|")
            for variant, first, second in seeded:
                scores = (first["test"]["NDCG@10"], second["test"]["NDCG@10"])
                print(f"| {variant} | {scores[0]:.4f} | {scores[1]:.4f} | {sum(scores) / 2:.4f} "
                      f"| {max(scores) - min(scores):.4f} |")
        print()
        for variant, row in runs.items():
            print(f"- `{variant}`: `{row['command']}` — seed {row['seed']}, text encoder {row['text_encoder']}, "
                  f"exclude_history {row['config']['exclude_history']}, {row['machine']}")


if __name__ == "__main__":
    main(sys.argv[1])
