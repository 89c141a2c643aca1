"""Where item text helps or hurts a model: ranking accuracy by how close each target's text is to the user's last
item, and how much of each model's top 10 is text-close to that item (issue #13's Amazon Beauty diagnosis).

    python bench/text_neighbours.py RUN_DIR [RUN_DIR ...] [--split test] [--out FILE.json]

Each RUN_DIR is a finished run folder (bench/reproduce.py or m2rec-train) whose best/ holds an M2Rec or the SASRec
baseline, all trained on the same data (same fingerprint). The text embeddings are those of the first run that has
them (its frozen buffer). History removed from the ranking, the protocol on which M2Rec's text branch costs most.

For every user of the split: the target's rank and the cosine c of the target's text embedding with the last input
item's. Users are grouped by c (quartiles, the top one split at the 90th percentile); per group, each model's
NDCG@10. Per model: how many of its top 10 are close to the last item (c above the 75th percentile of the targets'),
and the median rank of the last item's 10 nearest unseen items by text.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accelerate import Accelerator  # noqa: E402

from bench.reproduce import machine  # noqa: E402
from bench.sasrec import SASRec  # noqa: E402
from m2rec import M2RecForSequentialRecommendation  # noqa: E402
from m2rec.training.arguments import TrainArguments  # noqa: E402
from m2rec.training.data import prepare_dataset  # noqa: E402
from m2rec.training.evaluate import eval_loader, read_training_info, run_data_arguments  # noqa: E402
from m2rec.training.metrics import last_input_items, metrics_from_ranks, rank_targets  # noqa: E402

GROUP_QUANTILES = (0.25, 0.5, 0.75, 0.9)
NEAREST = 10


def load_model(run_dir: Path):
    model_type = json.loads((run_dir / "best" / "config.json").read_text())["model_type"]
    model_class = SASRec if model_type == SASRec.config_class.model_type else M2RecForSequentialRecommendation
    return model_class.from_pretrained(run_dir / "best").eval()


def unit_text(models: list) -> torch.Tensor:
    """(I + 1, E) the first text buffer among the models, each row L2-normalised (row 0, padding, stays 0)."""
    for model in models:
        text = getattr(getattr(model, "m2rec", None), "text_embeddings", None)
        if text is not None:
            return text.float() / text.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    raise SystemExit("none of the runs has item text (fusion='none' or SASRec only): give at least one with text")


@torch.no_grad()
def model_statistics(model, batches: list[dict], text: torch.Tensor, close_threshold: float) -> dict:
    """Per user: the target's NDCG@10 (history removed); per model: top-10 items close to the last item, and the
    median rank of the last item's nearest unseen items."""
    ranks, close_in_top10, nearest_ranks = [], [], []
    for batch in batches:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       last_position_only=True).logits.float()  # (B, I + 1)
        ranks.append(rank_targets(scores, batch["target"], batch["history"]))
        similarity = text[last_input_items(batch["input_ids"])] @ text.T  # (B, I + 1)
        unranked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, batch["history"], True)
        unranked[:, 0] = True
        scores.masked_fill_(unranked, float("-inf"))
        similarity.masked_fill_(unranked, -2.0)
        top10 = scores.topk(10, dim=1).indices  # (B, 10)
        close_in_top10.append((similarity.gather(1, top10) > close_threshold).sum(1))
        nearest = similarity.topk(NEAREST, dim=1).indices  # (B, NEAREST)
        nearest_scores = scores.gather(1, nearest)  # (B, NEAREST)
        nearest_ranks.append((scores[:, None, :] > nearest_scores[:, :, None]).sum(-1).float().median(dim=1).values)
    return {"ndcg": metrics_from_ranks(torch.cat(ranks), (10,))["NDCG@10"].numpy(),
            "close_in_top10": torch.cat(close_in_top10).float().mean().item(),
            "nearest_median_rank": torch.cat(nearest_ranks).median().item()}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with best/)")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    infos = [read_training_info(run / "best") for run in args.runs]
    fingerprints = {info["data_fingerprint"] for info in infos}
    if len(fingerprints) > 1:
        raise SystemExit(f"the runs were trained on different data ({len(fingerprints)} fingerprints): "
                         f"compare runs of one dataset")
    data_args = run_data_arguments(infos[0])
    data = prepare_dataset(data_args)
    models = [load_model(run) for run in args.runs]
    text = unit_text(models)
    loader = eval_loader(data, args.split, data_args.max_len, TrainArguments(eval_batch_size=args.eval_batch_size),
                         Accelerator(cpu=True))

    batches = list(loader)
    cosine = torch.cat([(text[batch["target"]] * text[last_input_items(batch["input_ids"])]).sum(1)
                        for batch in batches]).numpy()
    edges = np.quantile(cosine, GROUP_QUANTILES)
    group = np.digitize(cosine, edges)  # 0 .. len(edges)
    statistics = {str(run): model_statistics(model, batches, text, edges[2]) for run, model in zip(args.runs, models)}

    bounds = [cosine.min(), *edges, cosine.max()]
    groups = [{"cosine": [float(bounds[g]), float(bounds[g + 1])], "users": int((group == g).sum()),
               "NDCG@10": {run: float(stats["ndcg"][group == g].mean())
                           for run, stats in statistics.items()}}
              for g in range(len(edges) + 1)]
    models_summary = {run: {"NDCG@10": float(stats["ndcg"].mean()),
                            "close_in_top10": stats["close_in_top10"],
                            "nearest_median_rank": stats["nearest_median_rank"]}
                      for run, stats in statistics.items()}

    names = [run.name if len({r.name for r in args.runs}) == len(args.runs) else str(run) for run in args.runs]
    lines = [f"{args.split} users by the text cosine of target and last item (history removed), NDCG@10:", "",
             "| cosine | users | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    lines += [f"| {g['cosine'][0]:.2f}–{g['cosine'][1]:.2f} | {g['users']} | "
              + " | ".join(f"{g['NDCG@10'][str(run)]:.4f}" for run in args.runs) + " |" for g in groups]
    lines += [f"| all | {len(cosine)} | "
              + " | ".join(f"{models_summary[str(run)]['NDCG@10']:.4f}" for run in args.runs) + " |", "",
              "| per user | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
              f"| top-10 items with cosine > {edges[2]:.2f} to the last item | "
              + " | ".join(f"{models_summary[str(run)]['close_in_top10']:.2f}" for run in args.runs) + " |",
              f"| median rank of the last item's {NEAREST} nearest unseen items | "
              + " | ".join(f"{models_summary[str(run)]['nearest_median_rank']:.0f}" for run in args.runs) + " |"]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        report = {"command": shlex.join(["python", "bench/text_neighbours.py", *(argv or sys.argv[1:])]),
                  "machine": machine(), "split": args.split, "close_threshold": float(edges[2]),
                  "groups": groups, "models": models_summary}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
