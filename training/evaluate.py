"""Full-ranking evaluation (HR/NDCG/MRR@{5,10,20}) and the `m2rec-evaluate` command.

    m2rec-evaluate --model runs/ml-1m/best --split test [--exclude_history true]
    m2rec-evaluate --model runs/ml-1m/best --data_path other/ratings.csv --format table   # a model on other data
    accelerate launch --multi_gpu --num_processes 2 -m m2rec.training.evaluate --model ... --cpu true

The model is loaded strictly (`load_trained_model`). The data settings are read from the model folder's
training_info.json (any of them can be overridden, e.g. `--data_path`), the data is prepared as for training, and
its items are translated into the model's own ids through the folder's item_id_map.json: the row order of the data
file, or another file's numbering, cannot change which item a score belongs to. Items the model does not know are
counted and reported (see `examples_in_model_ids`). Under `accelerate launch` each process reads and ranks only its
share of the users (a contiguous range, `EvalExamples.shard`, read from the memory-mapped data) and the ranks are
gathered with each row's user index; each user is counted exactly once.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from .. import M2RecConfig, M2RecForSequentialRecommendation, M2RecItemTokenizer, SequentialRecommendationPipeline
from .data import (DataArguments, EvalDataset, EvalExamples, PreparedDataset, collate_eval, prepare_dataset,
                   read_json_file)
from .metrics import MetricAccumulator, history_statistics, rank_targets

logger = logging.getLogger(__name__)

def eval_loader(data: PreparedDataset, split: str, max_len: int, train_args, accelerator: Accelerator) -> DataLoader:
    """This process's share of the users of `split` (see `examples_loader`)."""
    examples = data.leave_one_out(split).shard(accelerator.process_index, accelerator.num_processes)
    return examples_loader(examples, max_len, train_args, accelerator)


def examples_loader(examples: EvalExamples, max_len: int, train_args, accelerator: Accelerator) -> DataLoader:
    """A loader over this process's examples, not prepared by Accelerate (which would split them again): padded
    to the largest share with examples that no metric counts (user_index -1), so that every process runs the same
    number of equal batches and `evaluate`'s gathers match up."""
    longest = int(accelerator.gather(torch.tensor([len(examples)], device=accelerator.device)).max())
    # Every example carries its full history: the statistics of both protocols need it (history_statistics).
    dataset = EvalDataset(examples, max_len, include_history=True, length=longest)
    return DataLoader(dataset, batch_size=train_args.eval_batch_size, shuffle=False, collate_fn=collate_eval,
                      num_workers=train_args.num_workers)


# Scores held at once by evaluation: a batch's (B, I) score matrix is cut into blocks of rows with at most this many
# scores (128 MB of float32), so that ranking a catalogue of 10^6 items takes blocks of 33 users instead of one
# 16 GB matrix for the default 4,096; catalogues up to 8,000 items keep the batch whole.
EVAL_SCORES_PER_BLOCK = 1 << 25


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, exclude_history: bool = False) -> dict:
    """Mean metrics over the users in every process's `loader` (`examples_loader`), plus "num_users".

    HR/NDCG/MRR@{5,10,20} follow `exclude_history`; `history_statistics`'s values (both protocols @10, the
    user's own items in the top 10, the rank of the last input item) come with them."""
    model.eval()
    block_rows = max(1, EVAL_SCORES_PER_BLOCK // (accelerator.unwrap_model(model).config.num_items + 1))
    accumulator = MetricAccumulator()
    for batch in loader:
        batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        blocks = [rank_block(model, {name: value[start:start + block_rows] for name, value in batch.items()},
                             exclude_history) for start in range(0, len(batch["target"]), block_rows)]
        ranks = torch.cat([ranks for ranks, _ in blocks])
        extras = {name: torch.cat([block_extras[name] for _, block_extras in blocks]) for name in blocks[0][1]}
        ranks, user_index, extras = accelerator.gather((ranks, batch["user_index"], extras))
        accumulator.add(ranks, user_index, extras)
    return accumulator.compute()


def rank_block(model, batch: dict, exclude_history: bool) -> tuple[torch.Tensor, dict]:
    """The targets' ranks (B,) under the protocol and `history_statistics`' values for a block of an eval batch."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   last_position_only=True).logits.float()  # (B, I)
    ranks_kept = rank_targets(scores, batch["target"])
    ranks_excluded = rank_targets(scores, batch["target"], batch["history"])
    extras = history_statistics(scores, ranks_kept, ranks_excluded, batch["input_ids"], batch["history"])
    return ranks_excluded if exclude_history else ranks_kept, extras


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {metrics[name]:.4f}" for name in ("HR@10", "NDCG@10", "MRR@10"))


def format_history_statistics(metrics: dict) -> str:
    """One line: NDCG@10 under both protocols and how much of the top 10 is the user's own history."""
    return (f"NDCG@10 history kept {metrics['history_kept/NDCG@10']:.4f} / excluded "
            f"{metrics['history_excluded/NDCG@10']:.4f}; own earlier items in the top 10: "
            f"{metrics['seen_in_top10']:.2f}; last input item in the top 10 for "
            f"{100 * metrics['last_item_in_top10']:.0f} % of users (first for {100 * metrics['last_item_at_top1']:.0f} %)")


# Data settings that `m2rec-evaluate` can override, to evaluate a model on other data or on moved files.
DATA_OVERRIDES = ("format", "data_path", "item_path", "user_column", "item_column", "time_column", "item_id_column",
                  "encoding", "cache_dir")
_SAME_AS_TRAINING = {"help": "Default: as in training (training_info.json)."}


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "A model folder written by m2rec-train (…/best)."})
    split: Literal["valid", "test"] = "test"
    exclude_history: bool = field(default=False, metadata={"help": "Remove each user's earlier items from the ranking."})
    eval_batch_size: int = 4096
    num_workers: int = 0
    cpu: bool = False
    output: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    format: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    data_path: Optional[str] = field(
        default=None, metadata={"help": "Evaluate on this interaction file instead of the training data (the item "
                                        "table of the training data is then not used unless --item_path names it)."})
    item_path: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    user_column: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    item_column: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    time_column: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    item_id_column: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    encoding: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)
    cache_dir: Optional[str] = field(default=None, metadata=_SAME_AS_TRAINING)


def main(argv=None):
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv, look_for_args_file=False)
    accelerator = Accelerator(cpu=args.cpu)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path(args.model)
    # Inference only: the model is moved, not wrapped for distributed training (DDP's reducer is not needed, and
    # tearing it down at exit can hang the process once its peer has exited).
    model = load_trained_model(folder).to(accelerator.device)
    model_item_ids = read_item_id_map(folder, model.config.num_items)
    info = read_training_info(folder)
    data_args = evaluation_data_arguments(info, args)
    with accelerator.main_process_first():
        data = prepare_dataset(data_args)
    share = data.leave_one_out(args.split).shard(accelerator.process_index, accelerator.num_processes)
    examples, counts = examples_in_model_ids(share, data, model_item_ids)
    coverage = coverage_report(data, model_item_ids, accelerator.reduce(
        torch.tensor(counts, device=accelerator.device), reduction="sum").tolist())
    same_data = None if info.get("data_fingerprint") is None else data.fingerprint == info["data_fingerprint"]
    if same_data is False:
        logger.warning("the data (%s) is not the data the model was trained on (its fingerprint differs); its items "
                       "are matched to the model's through %s", data_args.data_path or data_args.format,
                       folder / "item_id_map.json")
    loader = examples_loader(examples, model.config.max_len, args, accelerator)
    metrics = evaluate(model, loader, accelerator, args.exclude_history)
    if accelerator.is_main_process:
        data_path = str(Path(data_args.data_path).expanduser().resolve()) if data_args.data_path else None
        result = {"model": args.model, "split": args.split, "exclude_history": args.exclude_history, **metrics,
                  "data": {"format": data_args.format, "path": data_path, "fingerprint": data.fingerprint,
                           "same_as_training": same_data, **coverage}}
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
    end_run(accelerator)


def load_trained_model(folder: str | os.PathLike) -> M2RecForSequentialRecommendation:
    """The M2Rec saved in `folder`, loaded strictly: a folder of another model type, weights that cannot be read
    (a truncated or corrupt model.safetensors), weights whose tensors do not match the config (missing, unexpected
    or differently shaped) or non-finite weights are a ValueError naming the file and the type or tensors, never a
    partly initialised model."""
    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    model_type = read_json_file(config_file, dict).get("model_type")
    if model_type != M2RecConfig.model_type:
        raise ValueError(f"{config_file}: model_type {model_type!r}, not {M2RecConfig.model_type!r}; this folder "
                         f"holds another kind of model (m2rec-evaluate evaluates M2Rec; a bench/ baseline is evaluated by "
                         f"bench/reproduce.py --exclude-history-eval)")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    try:
        with safe_open(weights, framework="pt"):  # reads the header, which must cover the whole file
            pass
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {weights}: it is truncated or not a safetensors file ({e}); copy it again "
                         f"from the run, or save the model again") from None
    # Tensors of another shape are reported with the others below instead of raised with a pointer to a log table.
    model, loading = M2RecForSequentialRecommendation.from_pretrained(folder, output_loading_info=True,
                                                                      ignore_mismatched_sizes=True)
    problems = {kind: sorted(keys) for kind, keys in loading.items() if keys}
    if problems:
        raise ValueError(f"{weights} does not fit {config_file}: {problems}")
    non_finite = {name: f"{int((~torch.isfinite(tensor)).sum())} of {tensor.numel()}"
                  for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()}
    if non_finite:
        listed = ", ".join(f"{name} ({count} values)" for name, count in sorted(non_finite.items()))
        raise ValueError(f"{weights} holds NaN or infinite weights: {listed}; the training diverged or the file "
                         f"was corrupted")
    return model


def read_item_id_map(folder: Path, num_items: int) -> dict[str, int]:
    """The model's raw item id -> item id map (item_id_map.json), checked to cover exactly its items 1..num_items."""
    path = folder / "item_id_map.json"
    mapping = read_json_file(path, dict)
    if sorted(mapping.values()) != list(range(1, num_items + 1)):
        raise ValueError(f"{path} does not map raw ids one-to-one onto the model's items 1..{num_items}")
    return mapping


def save_model_folder(model, item_id_map: dict[str, int], folder: str | os.PathLike) -> None:
    """Writes a model folder: `save_pretrained`'s files plus the item vocabulary (item_id_map.json, written as it
    always was, and tokenizer_config.json, so that `AutoTokenizer` loads it) and, for M2Rec, the
    sequential-recommendation pipeline's code, named in config.json's `custom_pipelines`, so that the folder serves
    `pipeline("sequential-recommendation", model=folder, trust_remote_code=True)`. A bench baseline gets the
    vocabulary without the pipeline, which ranks through M2Rec's `recommend`."""
    vocabulary = M2RecItemTokenizer(item_id_map=item_id_map, model_max_length=model.config.max_len)
    if isinstance(model, M2RecForSequentialRecommendation):
        # Pipeline.save_pretrained is transformers' way to ship a custom pipeline: it writes custom_pipelines into
        # the config and saves the pipeline's file with the model and the tokenizer.
        SequentialRecommendationPipeline(model=model, tokenizer=vocabulary, device=model.device).save_pretrained(folder)
    else:
        model.save_pretrained(folder)
        vocabulary.save_pretrained(folder)


def read_training_info(folder: Path) -> dict:
    info = read_json_file(folder / "training_info.json", dict)
    if not isinstance(info.get("train_config"), dict):
        raise ValueError(f"{folder / 'training_info.json'}: expected an object with 'train_config'")
    return info


def run_data_arguments(info: dict) -> DataArguments:
    """The data settings a run was trained with, from its training_info.json, so that the same users, item ids
    and split are rebuilt."""
    return DataArguments(**_run_data_settings(info))


def _run_data_settings(info: dict) -> dict:
    data_fields = {f.name for f in fields(DataArguments)}
    return {k: v for k, v in info["train_config"].items() if k in data_fields}


def evaluation_data_arguments(info: dict, args: EvaluateArguments) -> DataArguments:
    """The run's data settings with the overrides given on the command line. A recorded path that does not exist
    from here is an error that says how to point at the data. (training_info.json keeps the paths as they were
    given, relative ones too: it is published with the model, and absolute paths would publish the trainer's
    folders.)"""
    settings = _run_data_settings(info)
    if args.data_path is not None:  # other data: the training data's item table belongs to the training data
        settings["item_path"] = None
    overrides = {name: getattr(args, name) for name in DATA_OVERRIDES if getattr(args, name) is not None}
    settings.update(overrides)
    for name in ("data_path", "item_path", "text_lookup_path"):
        value = settings.get(name)
        if value and name not in overrides and not Path(value).expanduser().exists():
            relative = "" if Path(value).expanduser().is_absolute() else ", a path relative to where training ran"
            raise FileNotFoundError(f"{name}={value!r} (training_info.json{relative}) is not found from "
                                    f"{Path.cwd()}; run from the folder training ran in, or pass --{name}")
    return DataArguments(**settings)


def examples_in_model_ids(examples: EvalExamples, data: PreparedDataset, model_item_ids: dict[str, int]) -> tuple[
        EvalExamples, list[int]]:
    """`examples` (of `data`) with items translated, by raw id, into the model's ids, vectorised over their items.

    Items the model does not know (it has no embedding for them) are dropped from the inputs; a user whose target
    is unknown cannot be ranked and is skipped, as is a user with no known item left in the input. Returns the
    examples and the counts [unknown inputs dropped (positions, over evaluated users), users skipped for an unknown
    target, users skipped for no known input] (`coverage_report` turns the counts of all processes into the report).
    """
    to_model = np.zeros(data.num_items + 1, dtype=np.int32)  # the data's item id -> the model's, 0 = unknown
    for raw_id, item in data.item_id_map.items():
        to_model[item] = model_item_ids.get(raw_id, 0)
    if not len(examples):
        return examples, [0, 0, 0]
    # The examples' items lie in one range of the data (a share is a range of users): translate it, then drop
    # the unknown items and move every example's bounds to the compacted range.
    first, last = int(examples.starts.min()), int(examples.ends.max()) + 1
    items = to_model[examples.items[first:last]]
    known_before = np.concatenate([[0], np.cumsum(items != 0)])  # known items before each position
    starts, ends = known_before[examples.starts - first], known_before[examples.ends - first]
    known_target = items[examples.ends - first] != 0
    known_input = ends > starts
    kept = known_target & known_input
    dropped = int(((examples.ends - examples.starts) - (ends - starts))[kept].sum())
    counts = [dropped, int((~known_target).sum()), int((known_target & ~known_input).sum())]
    return EvalExamples(items[items != 0], starts[kept], ends[kept], examples.user_index[kept]), counts


def coverage_report(data: PreparedDataset, model_item_ids: dict[str, int], counts: list[int]) -> dict:
    """unknown_items (distinct raw ids of the data the model does not know, with examples), and the summed counts of
    `examples_in_model_ids`: unknown_inputs_dropped, users_skipped_unknown_target, users_skipped_no_known_input.
    Raises when no user can be evaluated."""
    unknown = [raw_id for raw_id in data.item_id_map if raw_id not in model_item_ids]
    dropped, unknown_target, no_known_input = counts
    report = {"unknown_items": len(unknown), "unknown_item_examples": unknown[:5], "unknown_inputs_dropped": dropped,
              "users_skipped_unknown_target": unknown_target, "users_skipped_no_known_input": no_known_input}
    if unknown:
        logger.warning("%d of %d items of the data are unknown to the model (e.g. %s): dropped from %d inputs; %d "
                       "users with an unknown target and %d with no known input item are not evaluated",
                       len(unknown), data.num_items, unknown[:5], dropped, unknown_target, no_known_input)
    if unknown_target + no_known_input == data.num_users:
        raise ValueError(f"no user of the data can be evaluated: {report}")
    return report


def end_run(accelerator: Accelerator) -> None:
    """Close trackers and, under `accelerate launch`, leave the process group together, while every process is
    still alive."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
