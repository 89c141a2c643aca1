"""Run configuration: three dataclasses parsed by transformers' `HfArgumentParser` from a YAML/JSON file
(`--config`) and/or the command line (the command line wins).

`DataArguments` (what data, how it is prepared) lives in `training.data`; the model's hyperparameters are those of
`M2RecConfig` (documented there); `TrainArguments` holds the optimisation and bookkeeping. Defaults are the paper's
(§IV-A): AdamW, lr 1e-3, batch 2048, d = 64, 1 layer, d_state 32, dropout 0.2.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser

from .data import DataArguments

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "synthetic.yaml"


@dataclass
class ModelArguments:
    """M2Rec hyperparameters (see `M2RecConfig` for each); catalogue size, max_len and text width come from the data."""

    hidden_size: int = 64
    num_hidden_layers: int = 1
    state_size: int = 32
    conv_kernel: int = 4
    expand: int = 2
    hidden_dropout_prob: float = 0.2
    fft_mode: Literal["causal", "global", "none"] = "causal"
    fft_cut_ratio: float = 0.1
    fft_adaptive: bool = True
    selection_source: Literal["unfiltered", "filtered"] = "unfiltered"
    fusion: Literal["gate", "context_gate", "sum", "concat", "none"] = "gate"


@dataclass
class TrainArguments:
    output_dir: str = field(default="runs/synthetic", metadata={"help": "Where the run's files go (see README)."})
    seed: int = 42
    num_train_epochs: int = field(default=200, metadata={"help": "Upper bound; early stopping usually ends first."})
    learning_rate: float = 1e-3
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW decay of matrices; A_log, D, biases and norms are never decayed."})
    train_batch_size: int = field(default=2048, metadata={"help": "Sequences per step and process."})
    eval_batch_size: int = 4096
    gradient_accumulation_steps: int = 1
    last_position_training: bool = field(
        default=False, metadata={"help": "Train on one target per prefix (each prefix a sample, RecBole style) "
                                         "instead of every position; fft_mode='global' always does."})
    train_samples_per_epoch: Optional[int] = field(
        default=None, metadata={"help": "Cap each epoch at this many training samples, a new random draw every "
                                        "epoch (last-position training has a sample per prefix). Default: all."})
    early_stopping_patience: int = field(
        default=10, metadata={"help": "Stop after this many epochs without a better validation NDCG@10."})
    exclude_history: bool = field(
        default=False, metadata={"help": "Remove each user's earlier items from the ranking (the paper's tables "
                                         "keep them)."})
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    resume: bool = field(default=False, metadata={"help": "Continue from output_dir/checkpoint."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds a run; its files are moved to "
                                         "output_dir/archive/<time>/, never deleted."})
    resume_inexact: bool = field(
        default=False, metadata={"help": "With --resume: continue even if the checkpoint's RNG states (or a file's "
                                         "checksum) cannot be restored exactly; recorded in training_info.json."})
    resume_override: Optional[list[str]] = field(
        default=None, metadata={"help": "With --resume: settings the checkpoint fixes that this call may change "
                                        "(e.g. learning_rate train_batch_size), or 'data' for changed data."})
    num_workers: int = 0


def parse_args(argv: Optional[list[str]] = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """`--config FILE` (YAML or JSON, keys = field names) sets defaults; other flags override them. With no
    arguments at all, the embedded synthetic config is used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    config_path = DEFAULT_CONFIG if not argv else None
    if "--config" in argv:
        at = argv.index("--config")
        config_path, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    if config_path is not None:
        parser.set_defaults(**load_config_file(config_path, parser))
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))


def load_config_file(path: Path, parser: HfArgumentParser) -> dict:
    with open(path) as f:
        values = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}")
    return values


def to_dict(*arguments) -> dict:
    """All run settings as one flat dict (what `--config` accepts)."""
    merged = {}
    for argument in arguments:
        merged.update(asdict(argument))
    return merged
