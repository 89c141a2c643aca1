"""Fully sharded training (Accelerate's FSDP2) for catalogues whose item table, with its gradient and AdamW state,
outgrows one process: `accelerate launch --use_fsdp --fsdp_version 2 ... -m m2rec.training.train ...` (or an accelerate
config file with `distributed_type: FSDP`). Accelerate and torch do the sharding; this module adapts the run to them:

- on CPU processes Accelerate ignores FSDP and falls back to DDP; `enable_fsdp` applies it there too (see why there);
- `make_shardable` fits the model to `fully_shard`: its scalar parameters (the gate's α, β, the seen-item offset) are
  held as shape (1,), and the auto-wrap policy never gives the item table a unit apart from the scorer tied to it;
- `full_model` gathers the sharded weights into a plain model for `save_pretrained` (best/ loads with
  `from_pretrained` like any other run's).

What is sharded: every parameter, the item table included (its rows split over the processes), with its gradient and
AdamW moments; each unit is gathered whole while it computes. The frozen text table (I, E) stays a buffer, replicated:
FSDP shards parameters only, and gathering a frozen table for every step would cost traffic and save no peak memory.
"""

import re
import warnings

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch import nn
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.nn.utils import parametrize

# A parametrized parameter's key in state_dict(): <module>.parametrizations.<name>.original
_PARAMETRIZED_KEY = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def enable_fsdp(accelerator: Accelerator) -> None:
    """Shard this run with FSDP when `accelerate launch --use_fsdp` (or its config file) asked for it, on CPU
    processes too; then `accelerator.is_fsdp2`. Only FSDP2 is taken (FSDP1 is refused: m2rec's model is adapted and
    tested for FSDP2 only)."""
    if accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        # Accelerate picks FSDP for accelerator devices only, and on CPU processes (gloo) silently trains with DDP
        # instead, although torch's FSDP2 (`fully_shard`) runs on CPU. Set the state it would set on GPUs, with the
        # plugin read from the same FSDP_* settings: `prepare` then shards the model over gloo. This is what lets the
        # sharded path be run and tested on machines without a GPU.
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state = AcceleratorState()
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(f"FSDP version {accelerator.state.fsdp_plugin.fsdp_version}: m2rec-train shards with FSDP2; "
                         f"launch with --fsdp_version 2 (or fsdp_version: 2 in the accelerate config file)")
    if accelerator.is_fsdp2:
        # torch warns, for every unit whose output is a view, that an in-place change of that output before backward
        # would skip the unit's all-gather. Training changes no unit's output in place (the scorer's in-place padding
        # column is written at inference only; the loss reads the item table directly), and the sharded losses are
        # tested equal to one process's: the warnings would only bury the log.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)


class _ScalarAsVector(nn.Module):
    """Holds a 0-d parameter as shape (1,), which `fully_shard` accepts (it refuses 0-d ones); the module still reads a
    scalar, so the model's code and numbers are unchanged."""

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.reshape(())

    def right_inverse(self, scalar: torch.Tensor) -> torch.Tensor:
        return scalar.reshape(1)


def make_shardable(model: nn.Module, plugin: FullyShardedDataParallelPlugin) -> None:
    """Fit `model` (before the optimizer is built and `prepare` shards it) to FSDP2.

    Raises ValueError when the auto-wrap policy would shard a module holding the item table on its own: the scorer
    reads the same tensor (tied weights), and FSDP needs a shared parameter in one unit (Accelerate puts the input
    embeddings and the output projection in one unit when nothing else has claimed them)."""
    for module in list(model.modules()):
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() == 0:
                parametrize.register_parametrization(module, name, _ScalarAsVector())

    item_table = model.get_input_embeddings().weight
    holds_table = {module for module in model.modules()
                   if module is not model and any(p is item_table for p in module.parameters())}
    if _is_layer_policy(plugin) and plugin.transformer_cls_names_to_wrap is None:
        # Accelerate's default is the model's `_no_split_modules`, which name M2RecModel for device maps; the layers
        # are the units here.
        plugin.transformer_cls_names_to_wrap = [
            name for name in getattr(model, "_no_split_modules", None) or []
            if not any(type(module).__name__ == name for module in holds_table)]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is None:
        return
    for name, module in model.named_modules():
        if module in holds_table and policy(module):
            raise ValueError(
                f"the FSDP auto-wrap policy would shard {name} ({type(module).__name__}) as a unit of its own, but it "
                f"holds the item table, which the scorer shares (tied weights) and which must stay in one unit with "
                f"it: wrap the layers (--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP without "
                f"--fsdp_transformer_layer_cls_to_wrap wraps M2RecLayer), or raise --fsdp_min_num_params above "
                f"{sum(p.numel() for p in module.parameters())}")


def _is_layer_policy(plugin: FullyShardedDataParallelPlugin) -> bool:
    return getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is transformer_auto_wrap_policy


def full_model(accelerator: Accelerator, model: nn.Module, model_class: type) -> nn.Module | None:
    """The trained model, unsharded, for `save_pretrained`: the unwrapped model, or under FSDP a new `model_class`
    holding the full weights gathered from every process (a collective: call it on every process; the main process
    gets the model, the others None)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # full, on the main process's CPU
    if not accelerator.is_main_process:
        return None
    plain = model_class(model.config)
    shapes = {key: tensor.shape for key, tensor in plain.state_dict().items()}
    plain.load_state_dict({key: tensor.reshape(shapes[key]) for key, tensor in
                           ((_PARAMETRIZED_KEY.sub(r"\1\2", key), tensor) for key, tensor in state_dict.items())})
    return plain


def shard_summary(model: nn.Module) -> str:
    """What this process holds of a sharded model: its rows of the item table, and its parameter values."""
    table = model.get_input_embeddings().weight
    held = sum(parameter.to_local().numel() for parameter in model.parameters())
    total = sum(parameter.numel() for parameter in model.parameters())
    return f"{table.to_local().shape[0]} of the item table's {table.shape[0]} rows, {held} of {total} parameter values"
