"""Train M2Rec with Accelerate: one script for CPU, one GPU, many GPUs (`accelerate launch -m m2rec.training.train ...`),
and sharded with FSDP2 for large catalogues (`accelerate launch --use_fsdp --fsdp_version 2 ...`, see fsdp.py).

    m2rec-train                                   # the embedded synthetic default, offline, a couple of minutes
    m2rec-train --config training/configs/ml-1m.yaml --output_dir runs/ml-1m
    m2rec-train --config ... --resume true        # continue a killed run from output_dir/checkpoint
    m2rec-train --config ... --overwrite_output_dir true   # start afresh; the old run moves to output_dir/archive/

A run directory holds (see run_folder.py for how it is kept whole):
    best/             the selected model (save_pretrained: config.json, model.safetensors, remote code), its item
                      vocabulary (item_id_map.json, tokenizer_config.json), the pipeline's code (pipeline_m2rec.py)
                      and training_info.json (settings, metrics, the command, any resumes)
    checkpoint/       the latest full state (accelerator.save_state + trainer_state.json) for --resume
    metrics.jsonl     one line per epoch: train loss, validation metrics, times
    logs/<run>/       TensorBoard, one subfolder per training run (a resumed run continues its own)
    archive/<time>/   earlier runs' files, moved aside by --overwrite_output_dir true

A folder holding a run is refused unless --resume true or --overwrite_output_dir true; a second run in a folder
being written to is refused. --resume refuses a checkpoint that cannot be restored exactly (--resume_inexact true
accepts that) and changed data or settings the checkpoint fixes (--resume_override NAME... accepts those).

Model selection is on validation NDCG@10 with early stopping; the test split is evaluated once, with the
selected model, at the end.
"""

import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler

from .. import M2RecConfig, M2RecForSequentialRecommendation

from .arguments import ModelArguments, TrainArguments, parse_args, to_dict
from .data import (DataArguments, EpochSubsetSampler, PreparedDataset, TrainDataset, collate_train,
                   prepare_dataset)
from .evaluate import (end_run, evaluate, eval_loader, format_history_statistics, format_metrics,
                       load_trained_model, save_model_folder)
from .fsdp import enable_fsdp, full_model, make_shardable, shard_summary
from .run_folder import (RunFolderError, RunLock, changed_settings, checkpoint_problems, checkpoint_state,
                         claim_run_folder, find_checkpoint, inexact_resume_possible, promote_checkpoint,
                         quiet_checkpointing, recover_best, refuse_unapproved_changes, replace_directory,
                         run_on_main_process, save_checkpoint, write_text_atomic)
from .text import encode_item_texts, loadable_text_encoder, resolve_text_encoder

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """What `--resume` needs besides the model, optimizer and RNG states."""

    epoch: int = 0  # epochs completed
    best_ndcg: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    finished: bool = False
    tensorboard_run: str = ""  # logs/<tensorboard_run>: a resumed run continues its own
    resumes: list[dict] = field(default_factory=list)  # what each --resume changed or could not restore


def item_text_embeddings(data: PreparedDataset, data_args: DataArguments, show_progress: bool) -> torch.Tensor:
    """(I, E) text embeddings of every item, from the cache or the encoder."""
    embeddings, missing = encode_item_texts(
        data.item_texts, resolve_text_encoder(data_args.text_encoder), cache_dir=data_args.cache_dir,
        batch_size=data_args.text_batch_size, show_progress=show_progress)
    if missing:
        logger.warning("%d of %d items have no text; their text embedding is zero", missing, data.num_items)
    return embeddings


def build_model(model_args: ModelArguments, max_len: int, num_items: int, text_embeddings: torch.Tensor | None,
                data_args: DataArguments | None = None) -> M2RecForSequentialRecommendation:
    """An M2Rec for the data; with text, its config records how the text was made (`model_text_recipe`)."""
    options = asdict(model_args)
    if text_embeddings is not None:
        options["text_embedding_dim"] = text_embeddings.shape[1]
        if data_args is not None:
            options.update(model_text_recipe(data_args))
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=num_items, max_len=max_len, **options))
    if text_embeddings is not None:
        model.set_text_embeddings(text_embeddings)
    return model


def training_item_counts(data: PreparedDataset) -> torch.Tensor:
    """(I,) how often each item occurs in the training part of the histories (validation and test items left
    out), for the popularity sampler of the sampled softmax."""
    # Each user's last two positions are validation and test targets: count every interaction, then take those back.
    counts = np.bincount(data.items, minlength=data.num_items + 1)
    held_out = np.concatenate([data.items[data.offsets[1:] - 1], data.items[data.offsets[1:] - 2]])
    counts -= np.bincount(held_out, minlength=data.num_items + 1)
    return torch.from_numpy(counts).double()


def model_text_recipe(data_args: DataArguments) -> dict:
    """The config fields that let a saved model encode new items' text as training did (`add_items`): the encoder as a
    name `SentenceTransformer` loads (a local folder as its absolute path), the template, the columns. A lookup table
    (`text_lookup_path`) cannot be recorded: new items' fields are given after the lookup."""
    encoder = loadable_text_encoder(data_args.text_encoder)
    if Path(encoder).expanduser().is_dir():
        encoder = str(Path(encoder).expanduser().resolve())
    return {"text_encoder": encoder, "text_template": data_args.text_template,
            "text_columns": data_args.text_columns, "text_normalize": True}


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed]: decay matrices only; never the parameters marked `_no_weight_decay` (A_log, D,
    Δ bias), biases or norms."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        exempt = getattr(parameter, "_no_weight_decay", False) or parameter.dim() < 2
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adam_step(optimizer) -> int:
    """AdamW's own step counter (restored by --resume, so a resumed run continues it)."""
    for state in optimizer.state.values():
        return int(state["step"])
    return 0


def save_best(accelerator: Accelerator, model, model_class: type, output_dir: Path, data: PreparedDataset,
              info: dict) -> None:
    unsharded = full_model(accelerator, model, model_class)  # every process takes part in gathering FSDP's shards
    if accelerator.is_main_process:
        staging = output_dir / "best.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_model_folder(unsharded, data.item_id_map, staging)
        (staging / "training_info.json").write_text(json.dumps(info, indent=2))
        replace_directory(staging, output_dir / "best")
    accelerator.wait_for_everyone()


def append_jsonl(path: Path, record: dict, keep_epochs_up_to: int | None = None) -> None:
    """Append one record; with `keep_epochs_up_to`, first drop lines of epochs a resumed run will redo."""
    if keep_epochs_up_to is not None and path.exists():
        lines = [line for line in path.read_text().splitlines()
                 if line and json.loads(line).get("epoch", 0) <= keep_epochs_up_to]
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    if record:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
          command: str = "m2rec-train", model_builder=None) -> dict:
    """Train, select on validation NDCG@10, test once. Returns {"best_epoch", "validation", "test"}.

    `model_builder(max_len, num_items, text_embeddings)` replaces the M2Rec built from `model_args` by another
    `PreTrainedModel` with the same forward protocol (the benchmarks train their SASRec baseline this way).
    Raises RunFolderError (every process) when the output folder cannot be used as asked.
    """
    output_dir = Path(train_args.output_dir)
    accelerator = Accelerator(
        cpu=train_args.cpu, mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with="tensorboard", project_dir=str(output_dir),
        # Shuffling seeded by (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    enable_fsdp(accelerator)  # `accelerate launch --use_fsdp`, on GPUs and on CPU processes alike
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = RunLock(output_dir / ".lock")  # taken by the main process for all of them

    def claim_folder() -> tuple[bool, str]:
        resuming = claim_run_folder(output_dir, lock, train_args.resume, train_args.overwrite_output_dir)
        return resuming, time.strftime("run-%Y%m%d-%H%M%S")  # the TensorBoard run of a fresh start

    resuming, fresh_tensorboard_run = run_on_main_process(accelerator, claim_folder)
    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            return train_in_claimed_folder(accelerator, output_dir, resuming, fresh_tensorboard_run, model_args,
                                           data_args, train_args, command, model_builder)
    finally:
        lock.release()


def train_in_claimed_folder(accelerator: Accelerator, output_dir: Path, resuming: bool, fresh_tensorboard_run: str,
                            model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                            command: str, model_builder) -> dict:
    set_seed(train_args.seed)
    with accelerator.main_process_first():  # the first process fills the caches, the others read them
        data = prepare_dataset(data_args)
        text_embeddings = (None if model_args.fusion == "none"
                           else item_text_embeddings(data, data_args, accelerator.is_main_process))
    if model_builder is None:
        model_builder = partial(build_model, model_args, data_args=data_args)
    model = model_builder(data_args.max_len, data.num_items, text_embeddings)
    if getattr(model.config, "negative_sampler", None) == "popularity":
        model.set_item_counts(training_item_counts(data))
    model_class = type(model)
    logger.info("%s: %d users, %d items; model with %d trainable parameters", data_args.dataset_name,
                data.num_users, data.num_items, sum(p.numel() for p in model.parameters() if p.requires_grad))
    if accelerator.is_fsdp2:
        make_shardable(model, accelerator.state.fsdp_plugin)

    # The global filter sees the whole sequence, so it trains on one target per prefix (RecBole style).
    last_position_only = model_args.fft_mode == "global" or train_args.last_position_training
    train_data = TrainDataset(data, data_args.max_len, mode="last" if last_position_only else "all",
                              stride=train_args.train_window_stride)
    # The batch size is per process: `accelerate launch` over more processes multiplies the step's batch.
    step_sequences = train_args.train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    logger.info("batch: %d sequences per optimizer step = %d per process x %d processes x %d accumulation steps; "
                "about %d targets per step", step_sequences, train_args.train_batch_size, accelerator.num_processes,
                train_args.gradient_accumulation_steps, step_sequences * train_data.num_targets / len(train_data))
    train_loader = make_train_loader(train_data, train_args)
    # Each process reads only its share of the users, not split again by Accelerate (see examples_loader).
    valid_loader = eval_loader(data, "valid", data_args.max_len, train_args, accelerator)
    optimizer = torch.optim.AdamW(optimizer_groups(model, train_args.weight_decay), lr=train_args.learning_rate)
    scheduler = make_scheduler(optimizer, train_args, batches_per_epoch=len(train_loader))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if accelerator.is_fsdp2:
        logger.info("FSDP2 over %d processes: parameters, gradients and AdamW states sharded; the main process holds "
                    "%s", accelerator.num_processes, shard_summary(model))
    if scheduler is not None:  # prepared, it is saved and restored with the checkpoint
        scheduler = accelerator.prepare(scheduler)

    settings = to_dict(model_args, data_args, train_args)
    # What a checkpoint fixes: the settings, the process count (each process has its own RNG state and batch) and,
    # when sharded, the engine (FSDP saves its model and optimizer states in another format than DDP's).
    checkpointed_settings = {**settings, "num_processes": accelerator.num_processes,
                             **({"fsdp_version": 2} if accelerator.is_fsdp2 else {})}
    data_fingerprint = data.fingerprint
    if resuming:
        state = resume(accelerator, optimizer, scheduler, output_dir, checkpointed_settings, data_fingerprint,
                       train_args)
        if accelerator.is_main_process:
            append_jsonl(output_dir / "metrics.jsonl", {}, keep_epochs_up_to=state.epoch)
    else:
        state = TrainerState()
    state.tensorboard_run = state.tensorboard_run or fresh_tensorboard_run  # a fresh run (or an older checkpoint)
    tensorboard_dir = output_dir / "logs" / state.tensorboard_run
    accelerator.init_trackers(f"logs/{state.tensorboard_run}", config={
        k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))})
    info = {"dataset": data_args.dataset_name, "data_format": data_args.format,
            "text_encoder": None if model_args.fusion == "none" else data_args.text_encoder,
            "train_command": command, "train_config": settings, "seed": train_args.seed,
            "exclude_history": train_args.exclude_history, "num_users": data.num_users, "num_items": data.num_items,
            "data_fingerprint": data_fingerprint, "num_processes": accelerator.num_processes,
            "resumes": state.resumes, "item_text": item_text_recipe(data_args, data)}
    resumed_now = state.resumes[-1] if resuming else None

    epochs = tqdm(range(state.epoch, train_args.num_train_epochs), initial=state.epoch,
                  total=train_args.num_train_epochs, desc="epochs", disable=not accelerator.is_local_main_process)
    for epoch in epochs:
        if state.finished:
            break
        train_loader.set_epoch(epoch)
        started = time.perf_counter()
        train_loss = train_one_epoch(model, optimizer, scheduler, train_loader, accelerator, last_position_only,
                                     train_args.max_grad_norm)
        train_seconds = time.perf_counter() - started
        valid = evaluate(model, valid_loader, accelerator, train_args.exclude_history)

        state.epoch = epoch + 1
        improved = valid["NDCG@10"] > state.best_ndcg
        if improved:
            state.best_ndcg, state.best_epoch, state.epochs_without_improvement = valid["NDCG@10"], epoch + 1, 0
            save_best(accelerator, model, model_class, output_dir, data,
                      {**info, "best_epoch": state.best_epoch, "metrics": {"validation": valid}})
        else:
            state.epochs_without_improvement += 1
        state.finished = stopping_reached(state, train_args)

        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_seconds": train_seconds,
                  "eval_seconds": seconds - train_seconds, "optimizer_step": adam_step(optimizer),
                  "learning_rate": optimizer.param_groups[0]["lr"], "valid": valid}
        if resumed_now is not None:
            record["resumed"], resumed_now = resumed_now, None
        accelerator.log({"train/loss": train_loss, **{f"valid/{k}": v for k, v in valid.items()}}, step=epoch + 1)
        # The epoch's line goes before the checkpoint that marks the epoch done: a kill in between makes --resume
        # redo the epoch and drop the line, while the other order would lose the line for good.
        if accelerator.is_main_process:
            append_jsonl(output_dir / "metrics.jsonl", record)
        save_checkpoint(accelerator, output_dir, {"state": asdict(state), "data_fingerprint": data_fingerprint,
                                                  "settings": checkpointed_settings})
        logger.info("epoch %d/%d: train loss %.4f, validation HR@10 %.4f NDCG@10 %.4f%s (%.1f s)", epoch + 1,
                    train_args.num_train_epochs, train_loss, valid["HR@10"], valid["NDCG@10"],
                    " (best so far)" if improved else "", seconds)
        if state.epochs_without_improvement >= train_args.early_stopping_patience:
            logger.info("early stopping after epoch %d: validation NDCG@10 has not improved for %d epochs "
                        "(best %.4f at epoch %d)", epoch + 1, state.epochs_without_improvement,
                        state.best_ndcg, state.best_epoch)
        epochs.set_postfix(loss=f"{train_loss:.4f}", ndcg10=f"{valid['NDCG@10']:.4f}", best=state.best_epoch)

    results = test_best_model(accelerator, model_class, output_dir, data, data_args, train_args, state.resumes)
    if accelerator.is_main_process:
        print(run_summary(results, output_dir, tensorboard_dir, data, train_args))
    end_run(accelerator)
    return results


def resume(accelerator: Accelerator, optimizer, scheduler, output_dir: Path, settings: dict, data_fingerprint: str,
           train_args: TrainArguments) -> TrainerState:
    """Restore model, optimizer and RNG states from the newest complete checkpoint, exactly, on these data and
    settings; what `--resume_override` and `--resume_inexact` let through is recorded in the returned state."""
    checkpoint, record = find_checkpoint(output_dir)
    changes = changed_settings(record, settings, data_fingerprint, defaults=default_settings())
    refuse_unapproved_changes(changes, train_args.resume_override, settings)
    problems = checkpoint_problems(checkpoint, record, accelerator.num_processes)
    if problems and not (train_args.resume_inexact and inexact_resume_possible(problems)):
        way_on = ("Continue anyway with --resume_inexact true (recorded in training_info.json), or start afresh "
                  if inexact_resume_possible(problems) else "Start afresh ")
        raise RunFolderError(f"--resume true: {checkpoint} cannot be restored exactly: "
                             f"{'; '.join(problems.values())}. {way_on}with --overwrite_output_dir true.")
    try:
        with quiet_checkpointing():
            accelerator.load_state(str(checkpoint))
    except Exception as error:
        raise RunFolderError(f"--resume true: cannot restore {checkpoint}: {error}") from error
    # load_state brought back the checkpoint's learning rate and decay; an approved override must take effect.
    set_learning_rate(optimizer, scheduler, train_args.learning_rate)
    optimizer.param_groups[0]["weight_decay"] = train_args.weight_decay  # the decayed group (optimizer_groups)
    saved = checkpoint_state(record)
    state = TrainerState(**{name: saved[name] for name in TrainerState.__dataclass_fields__ if name in saved})

    def repair_interrupted_swaps() -> None:
        promote_checkpoint(output_dir, checkpoint)
        recover_best(output_dir, state.best_epoch)

    accelerator.wait_for_everyone()  # every process has read the checkpoint before it moves
    run_on_main_process(accelerator, repair_interrupted_swaps)
    # Re-judged with this call's settings: a run that stopped at its epoch cap continues under a higher one.
    state.finished = stopping_reached(state, train_args)
    state.resumes.append({"after_epoch": state.epoch, "checkpoint": checkpoint.name, "overridden": changes,
                          "inexact": list(problems.values())})
    logger.info("resumed from %s after epoch %d (optimizer step %d)%s%s", checkpoint, state.epoch,
                adam_step(optimizer), f"; overridden: {changes}" if changes else "",
                f"; INEXACT: {'; '.join(problems.values())}" if problems else "")
    return state


def default_settings() -> dict:
    """Every setting's default: a setting that a checkpoint of an older m2rec lacks is unchanged at its default."""
    return to_dict(ModelArguments(), DataArguments(), TrainArguments())


def make_scheduler(optimizer, train_args: TrainArguments, batches_per_epoch: int):
    """The learning-rate schedule over num_train_epochs (in single-process steps, as Accelerate counts them), or
    None for a constant rate without warm-up, which needs no state."""
    if train_args.lr_scheduler_type == "constant" and train_args.warmup_ratio == 0:
        return None
    if not 0 <= train_args.warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio={train_args.warmup_ratio} must be between 0 and 1")
    steps = train_args.num_train_epochs * math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)
    name = "constant_with_warmup" if train_args.lr_scheduler_type == "constant" else train_args.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=round(steps * train_args.warmup_ratio),
                         num_training_steps=steps)


def set_learning_rate(optimizer, scheduler, learning_rate: float) -> None:
    """Make `learning_rate` the peak rate, at the schedule's current point (unchanged when it is the checkpoint's)."""
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        return
    schedule = scheduler.scheduler  # the LambdaLR inside Accelerate's wrapper
    schedule.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
        group["lr"] = learning_rate * factor(schedule.last_epoch)


def run_summary(results: dict, output_dir: Path, tensorboard_dir: Path, data: PreparedDataset,
                train_args: TrainArguments) -> str:
    history = "excluded from" if train_args.exclude_history else "kept in"
    return (f"protocol: leave-one-out (each user's last item is the test target, the one before it validation), "
            f"full ranking over all {data.num_items} items, the user's earlier items {history} the ranking\n"
            f"best epoch {results['best_epoch']} (selected on validation NDCG@10)\n"
            f"validation: {format_metrics(results['validation'])}\n"
            f"test:       {format_metrics(results['test'])}\n"
            f"test, both protocols: {format_history_statistics(results['test'])}\n"
            f"model:       {output_dir / 'best'}\n"
            f"metrics:     {output_dir / 'metrics.jsonl'}\n"
            f"TensorBoard: {tensorboard_dir}")


def make_train_loader(train_data: TrainDataset, train_args: TrainArguments) -> DataLoader:
    """Reshuffled every epoch (Accelerate seeds the shuffle by epoch), or `train_samples_per_epoch` random samples,
    a new draw every epoch."""
    subset = (None if train_args.train_samples_per_epoch is None
              else EpochSubsetSampler(len(train_data), train_args.train_samples_per_epoch, train_args.seed))
    return DataLoader(train_data, batch_size=train_args.train_batch_size, shuffle=subset is None, sampler=subset,
                      collate_fn=collate_train, num_workers=train_args.num_workers)


def stopping_reached(state: TrainerState, train_args: TrainArguments) -> bool:
    """Early stopping's patience is used up, or the epoch cap is reached."""
    return (state.epochs_without_improvement >= train_args.early_stopping_patience
            or state.epoch >= train_args.num_train_epochs)


def train_one_epoch(model, optimizer, scheduler, loader, accelerator, last_position_only: bool,
                    max_grad_norm: float | None) -> float:
    """One pass over the training data; returns the mean loss (over processes and batches)."""
    model.train()
    total, batches = torch.zeros((), device=accelerator.device), 0
    for batch in tqdm(loader, desc="train", leave=False, disable=not accelerator.is_local_main_process):
        labels = batch["labels"]
        if last_position_only:  # (B, L) with one label at the last real position → (B,)
            last = batch["attention_mask"].sum(1) - 1
            labels = labels[torch.arange(len(labels), device=labels.device), last]
        with accelerator.accumulate(model):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                         return_logits=False).loss
            accelerator.backward(loss)
            if max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
        total += loss.detach()
        batches += 1
    return accelerator.reduce(total, reduction="mean").item() / max(batches, 1)


def test_best_model(accelerator, model_class, output_dir: Path, data, data_args: DataArguments,
                    train_args: TrainArguments, resumes: list[dict]) -> dict:
    """Evaluate the selected checkpoint on the test split (the only time the test split is read) and record the
    metrics, and every resume of the run, in best/training_info.json."""
    best_dir = output_dir / "best"
    # Strictly for M2Rec (a bench baseline brings its own class): never test a partly initialised model.
    model = (load_trained_model(best_dir) if model_class is M2RecForSequentialRecommendation
             else model_class.from_pretrained(best_dir))
    model = model.to(accelerator.device)  # inference only: no DDP wrapper
    test_loader = eval_loader(data, "test", data_args.max_len, train_args, accelerator)
    test = evaluate(model, test_loader, accelerator, train_args.exclude_history)
    info = json.loads((best_dir / "training_info.json").read_text())
    info["metrics"]["test"] = test
    info["resumes"] = resumes
    info["compute"] = run_compute(accelerator, output_dir / "metrics.jsonl")
    if accelerator.is_main_process:
        write_text_atomic(best_dir / "training_info.json", json.dumps(info, indent=2))
    accelerator.wait_for_everyone()
    return {"best_epoch": info["best_epoch"], **info["metrics"]}


def item_text_recipe(data_args: DataArguments, data: PreparedDataset) -> dict:
    """How each item's text was rendered, for the model card: new items need the same text and encoder. `example`
    is the first item with text, {raw id: text}."""
    raw_ids = {model_id: raw for raw, model_id in data.item_id_map.items()}
    first = next((item for item in range(1, data.num_items + 1) if data.item_texts[item]), None)
    return {"template": data_args.text_template, "columns": data_args.text_columns,
            "example": None if first is None else {raw_ids[first]: data.item_texts[first]}}


def run_compute(accelerator: Accelerator, metrics_file: Path) -> dict:
    """Where the run trained and for how long, for the model card. `epochs` and `wall_seconds` (training and
    validation, without data preparation and the test) are summed over metrics.jsonl, which a resumed run rewinds to
    the epochs it kept, so a redone epoch counts once."""
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    epochs = [json.loads(line) for line in lines if line]
    device = accelerator.device
    return {
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "epochs": len(epochs), "wall_seconds": round(sum(e["train_seconds"] + e["eval_seconds"] for e in epochs), 1),
        "framework_versions": {name: _version(name) for name in ("python", "torch", "transformers", "accelerate",
                                                                 "m2rec")},
    }


def _cpu_name() -> str:
    """The CPU model (/proc/cpuinfo on Linux, where platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str:
    if name == "python":
        return platform.python_version()
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["m2rec-train", *argv])
    try:
        train(*parse_args(argv), command=command)
    except RunFolderError as error:
        sys.exit(f"m2rec-train: error: {error}")


if __name__ == "__main__":
    main()
