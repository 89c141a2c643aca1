"""Run configuration: three dataclasses parsed by transformers' `HfArgumentParser`, in layers, each over the one
before: the dataclass defaults, then a config file, then the command line. The config file is `--config FILE` (YAML
or JSON, or the name of a shipped config such as `ml-1m`) or, without `--config`, the embedded default
(configs/synthetic.yaml), so `m2rec-train --output_dir X` runs the embedded default with that one change.

A `--config` file that does not name its own data (no `format` or `data_path`) is a change to the embedded default
run and layers over it, so `num_train_epochs: 5` alone still trains the synthetic data offline. A file that names
its data replaces the embedded default: that default is tuned for a toy dataset (max_len 50, 40 epochs, a small
text encoder, output_dir runs/synthetic), and a real-data config that leaves one of those out must get the
documented default, not the toy's value.

`DataArguments` (what data, how it is prepared) lives in `training.data`; the model's hyperparameters are those of
`M2RecConfig` (documented there); `TrainArguments` holds the optimisation and bookkeeping. Defaults are the paper's
(§IV-A): AdamW, lr 1e-3, batch 2048, d = 64, 1 layer, d_state 32, dropout 0.2.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser

from .data import DataArguments

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = SHIPPED_CONFIGS / "synthetic.yaml"
# A config file setting one of these describes its own data, so it does not inherit the embedded default's settings.
DATA_KEYS = frozenset({"format", "data_path"})


@dataclass
class ModelArguments:
    """M2Rec hyperparameters (see `M2RecConfig` for each); catalogue size, max_len and text width come from the data."""

    hidden_size: int = 64
    num_hidden_layers: int = 1
    state_size: int = 32
    conv_kernel: int = 4
    expand: int = 2
    hidden_dropout_prob: float = 0.2
    text_dropout_prob: float = 0.0
    mixer_residual: bool = True
    fft_mode: Literal["causal", "global", "none"] = "causal"
    fft_cut_ratio: float = 0.1
    fft_adaptive: bool = True
    selection_source: Literal["unfiltered", "filtered"] = "unfiltered"
    fusion: Literal["gate", "context_gate", "sum", "concat", "none"] = "gate"
    fusion_residual: bool = field(
        default=False, metadata={"help": "Y = E_mamba + fusion(E_text, E_mamba) instead of the paper's fusion alone "
                                         "(see M2RecConfig.fusion_residual)."})
    seen_item_bias: bool = False
    loss_excludes_history: bool = field(
        default=False, metadata={"help": "Leave each position's already-seen items (except its target) out of the "
                                         "training softmax: the history-removed protocol in training (not in the "
                                         "paper; see M2RecConfig.loss_excludes_history)."})
    loss: Literal["full_softmax", "sampled_softmax"] = field(
        default="full_softmax", metadata={"help": "full_softmax: exact, over the whole catalogue. sampled_softmax: "
                                                  "over num_negatives negatives per batch with the logQ correction, "
                                                  "for catalogues of 10^5 items and more (see M2RecConfig.loss)."})
    negative_sampler: Literal["uniform", "popularity", "in_batch", "mixed"] = field(
        default="uniform", metadata={"help": "Where sampled_softmax draws its negatives: uniformly, by training "
                                             "count, from the batch's targets, or half in-batch half uniform."})
    num_negatives: int = field(default=1024, metadata={"help": "Negatives per batch (or per sequence, see "
                                                                "negative_sharing) for sampled_softmax."})
    negative_sharing: Literal["batch", "sequence"] = field(
        default="batch", metadata={"help": "sampled_softmax: one draw of negatives for the whole batch, or one per "
                                           "sequence (uniform and popularity samplers; see "
                                           "M2RecConfig.negative_sharing)."})
    item_representation: Literal["id", "id+text"] = "id"


@dataclass
class TrainArguments:
    output_dir: str = field(default="runs/synthetic", metadata={"help": "Where the run's files go (see README)."})
    seed: int = 42
    num_train_epochs: int = field(default=200, metadata={"help": "Upper bound; early stopping usually ends first."})
    learning_rate: float = 1e-3
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW decay of matrices; A_log, D, biases and norms are never decayed."})
    train_batch_size: int = field(
        default=2048, metadata={"help": "Sequences per step and process: the global batch is this * processes * "
                                        "gradient_accumulation_steps."})
    eval_batch_size: int = 4096
    gradient_accumulation_steps: int = 1
    last_position_training: bool = field(
        default=False, metadata={"help": "Train on one target per prefix (each prefix a sample, RecBole style) "
                                         "instead of every position; fft_mode='global' always does."})
    train_window_stride: Optional[int] = field(
        default=None, metadata={"help": "Every-position training: cut windows of max_len inputs ending every N "
                                        "items, with the loss on their last N positions only, so every target is "
                                        "trained once per epoch with at least max_len - N items of context, at "
                                        "max_len / N times the work. Default: max_len (windows overlap by one)."})
    train_samples_per_epoch: Optional[int] = field(
        default=None, metadata={"help": "Cap each epoch at this many training samples, a new random draw every "
                                        "epoch (last-position training has a sample per prefix). Default: all."})
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "Learning-rate decay after the warm-up, to zero at num_train_epochs."})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Share of num_train_epochs' optimizer steps over which the learning rate "
                                       "rises linearly from zero."})
    max_grad_norm: Optional[float] = field(
        default=None, metadata={"help": "Clip the gradients' global norm to this value. Default: no clipping."})
    early_stopping_patience: int = field(
        default=10, metadata={"help": "Stop after this many epochs without a better validation NDCG@10."})
    exclude_history: bool = field(
        default=False, metadata={"help": "Remove each user's earlier items from the ranking (the paper's tables "
                                         "keep them)."})
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present (also sharded: "
                                                       "accelerate launch --use_fsdp runs FSDP2 over CPU processes)."})
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
    """The run's settings: the dataclass defaults, under the embedded default (unless `--config` names its own
    data), under `--config`, under the other flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument("--config")
    config_name = config_flag.parse_known_args(argv)[0].config
    parser = build_parser()
    values = load_config_file(DEFAULT_CONFIG, parser)
    if config_name is not None:
        config_values = load_config_file(resolve_config(config_name), parser)
        if DATA_KEYS & config_values.keys():
            values = {}
        values.update(config_values)
    # Defaults, not arguments: argparse shows them in --help and lets every flag on the command line win.
    parser.set_defaults(**values)
    # [:3]: the namespace of --config itself follows the three dataclasses when the flag is given.
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[:3])


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    shipped = ", ".join(shipped_config_names())
    parser.add_argument(
        "--config", metavar="FILE_OR_NAME", default=argparse.SUPPRESS,
        help=f"YAML or JSON file of option: value pairs, or the name of a shipped config ({shipped}). It layers "
             f"over the embedded default ({DEFAULT_CONFIG.stem}, whose values are the defaults shown here) unless it "
             f"names its own data (format or data_path), which starts from the built-in defaults instead; flags on "
             f"the command line override it.")
    return parser


def resolve_config(name: str) -> Path:
    """A config file's path: `name` itself when it is a file, else the shipped config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    if path.name == name and shipped.is_file():
        return shipped
    raise ValueError(f"--config {name}: no such file, nor a shipped config "
                     f"(shipped: {', '.join(shipped_config_names())})")


def shipped_config_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml"))


def load_config_file(path: Path, parser: HfArgumentParser) -> dict:
    with open(path) as f:
        values = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}")
    for name, value in values.items():
        # argparse checks the choices of command-line values only, not of defaults.
        if actions[name].choices is not None and value not in actions[name].choices:
            raise ValueError(f"{path}: {name}: {value!r} is not one of {list(actions[name].choices)}")
    return values


def to_dict(*arguments) -> dict:
    """All run settings as one flat dict (what `--config` accepts)."""
    merged = {}
    for argument in arguments:
        merged.update(asdict(argument))
    return merged
