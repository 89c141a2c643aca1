"""Full-ranking evaluation (HR/NDCG/MRR@{5,10,20}) and the `m2rec-evaluate` command.

    m2rec-evaluate --model runs/ml-1m/best --split test [--exclude_history true]
    accelerate launch --multi_gpu --num_processes 2 -m m2rec.training.evaluate --model ... --cpu true

The data settings are read from the model folder's training_info.json, so the same users, item ids and split are
rebuilt (from the cache when it is there). Under `accelerate launch` each process ranks its share of the users and
`gather_for_metrics` brings the ranks together; each user is counted exactly once.
"""

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from .data import DataArguments, EvalDataset, PreparedDataset, collate_eval, prepare_dataset
from .metrics import MetricAccumulator, rank_targets


def eval_loader(data: PreparedDataset, split: str, max_len: int, train_args) -> DataLoader:
    dataset = EvalDataset(data, split, max_len, include_history=train_args.exclude_history)
    return DataLoader(dataset, batch_size=train_args.eval_batch_size, shuffle=False, collate_fn=collate_eval,
                      num_workers=train_args.num_workers)


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, exclude_history: bool = False) -> dict:
    """Mean metrics over the users in `loader` (a prepared eval loader), plus "num_users"."""
    model.eval()
    accumulator = MetricAccumulator()
    for batch in loader:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       last_position_only=True).logits  # (B, I)
        ranks = rank_targets(scores.float(), batch["target"], batch["history"] if exclude_history else None)
        accumulator.add(*accelerator.gather_for_metrics((ranks, batch["user_index"])))
    return accumulator.compute()


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {metrics[name]:.4f}" for name in ("HR@10", "NDCG@10", "MRR@10"))


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "A model folder written by m2rec-train (…/best)."})
    split: Literal["valid", "test"] = "test"
    exclude_history: bool = field(default=False, metadata={"help": "Remove each user's earlier items from the ranking."})
    eval_batch_size: int = 4096
    num_workers: int = 0
    cpu: bool = False
    output: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})


def main(argv=None):
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv, look_for_args_file=False)
    from .. import M2RecForSequentialRecommendation

    data_args = run_data_arguments(json.loads((Path(args.model) / "training_info.json").read_text()))

    accelerator = Accelerator(cpu=args.cpu)
    with accelerator.main_process_first():
        data = prepare_dataset(data_args)
    # Inference only: the model is moved, not wrapped for distributed training (DDP's reducer is not needed, and
    # tearing it down at exit can hang the process once its peer has exited).
    model = M2RecForSequentialRecommendation.from_pretrained(args.model).to(accelerator.device)
    loader = accelerator.prepare(eval_loader(data, args.split, data_args.max_len, args))
    metrics = evaluate(model, loader, accelerator, args.exclude_history)
    if accelerator.is_main_process:
        result = {"model": args.model, "split": args.split, "exclude_history": args.exclude_history, **metrics}
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
    end_run(accelerator)


def run_data_arguments(info: dict) -> DataArguments:
    """The data settings a run was trained with, from its training_info.json, so that the same users, item ids
    and split are rebuilt."""
    data_fields = {f.name for f in fields(DataArguments)}
    return DataArguments(**{k: v for k, v in info["train_config"].items() if k in data_fields})


def end_run(accelerator: Accelerator) -> None:
    """Close trackers and, under `accelerate launch`, leave the process group together, while every process is
    still alive."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
