"""The run folder's lifecycle: who may write in it, what a complete checkpoint is, and how files are replaced.

    output_dir/.lock              pid and host of the run writing here (the main process's)
    output_dir/checkpoint/        the latest full state; trainer_state.json, written last, marks it complete and
                                  lists every file's size and sha256 (so a truncated file is caught before loading)
    output_dir/archive/<time>/    an earlier run's files, moved aside by --overwrite_output_dir true

A run never deletes or truncates another run's files: it refuses a folder that holds a run unless told to resume
it or to archive it, and refuses a folder another live process is writing to.
"""

import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from accelerate.utils import broadcast_object_list

from .data import sha256_file

logger = logging.getLogger(__name__)

# What a run writes; any of them means the folder holds a run (the .tmp/.old ones are left by an interrupted save).
RUN_ENTRIES = ("metrics.jsonl", "best", "best.tmp", "best.old", "checkpoint", "checkpoint.tmp", "checkpoint.old")
# TensorBoard files alone (a run killed in its first epoch) are no run to protect: each run writes its own
# logs/<run>/, so a new run does not mix with them. An overwritten run's logs are archived with it.
LOGS = "logs"
CHECKPOINT = "checkpoint"
# The candidates `replace_directory` can leave behind when killed between its renames.
CHECKPOINT_CANDIDATES = (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old")
COMPLETION_MARK = "trainer_state.json"

# Settings a resumed run may change freely: they decide when to stop, how to evaluate or where files are, not what
# the checkpoint's model, optimizer and data order are. Every other setting must match unless overridden.
RESUMABLE_CHANGES = {"num_train_epochs", "early_stopping_patience", "eval_batch_size", "num_workers", "output_dir",
                     "cache_dir", "text_batch_size", "cpu", "dataset_name", "data_path", "item_path",
                     "text_lookup_path", "config", "resume", "overwrite_output_dir", "resume_inexact",
                     "resume_override"}
DATA = "data"  # the --resume_override name of the data fingerprint


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do."""


class RunLock:
    """`output_dir/.lock`, created with O_EXCL and holding {"pid", "host", "since"}: one run per folder.

    A lock left by a killed run (same host, its pid no longer alive) is taken over with a warning; a lock of
    another host cannot be checked and is refused, naming the host and pid.
    """

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> None:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a stale lock removed by us may be taken by a racing run first
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if not self._is_stale(owner):
                    holder = (f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}"
                              if owner else "its lock file is empty or unreadable")
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another run ({holder}). Wait for it, or use another "
                        f"--output_dir; if that run is gone, delete {self.path}.")
                logger.warning("taking over the stale lock %s of pid %s, which is no longer running", self.path,
                               owner.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as f:
                json.dump(mine, f)
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if self.held and self._read_owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def _read_owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written this instant, or damaged: treated as held

    @staticmethod
    def _is_stale(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        if owner["pid"] == os.getpid():  # a reused pid (e.g. a restarted container): it is not us holding it
            return True
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def claim_run_folder(output_dir: Path, lock: RunLock, resume: bool, overwrite: bool) -> bool:
    """Take the folder's lock, then refuse a folder that holds a run unless resuming it or archiving it.

    Returns whether to resume: `--resume true` on a folder holding nothing of a run starts it (so one command
    both starts and continues a run, as bench/reproduce.py does), with a warning naming the folder.
    """
    if resume and overwrite:
        raise RunFolderError("--resume true and --overwrite_output_dir true contradict each other; choose one")
    output_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        existing = existing_run_entries(output_dir)
        if resume and not existing:
            logger.warning("--resume true: %s holds no run yet; starting one", output_dir)
            return False
        if existing and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"{output_dir} already holds a run ({', '.join(existing)}). Continue it with --resume true, or "
                    f"start afresh with --overwrite_output_dir true (its files are moved to {output_dir}/archive/), "
                    f"or choose another --output_dir.")
            existing += [LOGS] if (output_dir / LOGS).exists() else []
            archived = archive_run(output_dir, existing)
            logger.warning("moved the previous run's files (%s) to %s", ", ".join(existing), archived)
        return resume
    except BaseException:
        lock.release()
        raise


def existing_run_entries(output_dir: Path) -> list[str]:
    return [name for name in RUN_ENTRIES if (output_dir / name).exists()]


def archive_run(output_dir: Path, entries: list[str]) -> Path:
    """Move `entries` of `output_dir` to a new `output_dir/archive/<time>/` (renames: nothing is copied or lost)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = output_dir / "archive" / stamp
    suffix = 1
    while archive.exists():
        archive, suffix = output_dir / "archive" / f"{stamp}-{suffix}", suffix + 1
    archive.mkdir(parents=True)
    for name in entries:
        (output_dir / name).rename(archive / name)
    return archive


def run_on_main_process(accelerator, action):
    """`action()` on the main process only; its result, or its RunFolderError, reaches every process, so that
    all of them go on or stop together (instead of the others waiting forever at the next barrier)."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("result", action())]
        except RunFolderError as error:
            outcome = [("error", str(error))]
    broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise RunFolderError(value)
    return value


def replace_directory(staging: Path, final: Path) -> None:
    """Move a fully written `staging` folder to `final`, so a kill never leaves a half-written `final`.

    A kill between the renames leaves `final.old` and `staging` (complete); `find_checkpoint` looks there too.
    """
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader sees the old file or the new one, never a part."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def save_checkpoint(accelerator, output_dir: Path, record: dict) -> None:
    """`accelerator.save_state` to checkpoint.tmp, then `record` plus a manifest of every file as
    trainer_state.json (written last: its presence marks the checkpoint complete), then the swap."""
    staging = output_dir / (CHECKPOINT + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    with quiet_checkpointing():
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's random_states_<i>.pkl is written
    if accelerator.is_main_process:
        # Recursive: FSDP saves its sharded model and optimizer states as folders of files.
        manifest = {path.relative_to(staging).as_posix(): file_identity(path) for path in sorted(staging.rglob("*"))
                    if path.is_file()}
        (staging / COMPLETION_MARK).write_text(json.dumps({**record, "files": manifest}))
        replace_directory(staging, output_dir / CHECKPOINT)
    accelerator.wait_for_everyone()


def file_identity(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def checkpoint_state(record: dict) -> dict:
    """The TrainerState fields of a checkpoint's record (an older m2rec wrote the state alone)."""
    return record["state"] if "state" in record else record


def find_checkpoint(output_dir: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint among checkpoint/, checkpoint.tmp/ and checkpoint.old/, with its record.

    Raises RunFolderError naming what was found when none is complete and readable.
    """
    found, complete = [], []
    for rank, name in enumerate(CHECKPOINT_CANDIDATES):
        path = output_dir / name
        if not path.is_dir():
            continue
        try:
            record = json.loads((path / COMPLETION_MARK).read_text())
            epoch = checkpoint_state(record)["epoch"]
        except FileNotFoundError:
            found.append(f"{name}/ (incomplete: no {COMPLETION_MARK})")
            continue
        except (OSError, ValueError, KeyError, TypeError) as error:
            found.append(f"{name}/ (unreadable {COMPLETION_MARK}: {error!r})")
            continue
        found.append(f"{name}/ (after epoch {epoch})")
        complete.append((epoch, -rank, path, record))
    if not complete:
        raise RunFolderError(
            f"--resume true: no complete checkpoint in {output_dir} (found: {'; '.join(found) or 'nothing'}). "
            f"Nothing was changed. Start a new run there with --overwrite_output_dir true (the old files are "
            f"archived), or without --resume in another --output_dir.")
    _, _, path, record = max(complete, key=lambda candidate: candidate[:2])
    return path, record


def checkpoint_problems(checkpoint: Path, record: dict, num_processes: int) -> dict[str, str]:
    """{file name: why} for what cannot be restored exactly (missing, truncated or altered files, RNG states)."""
    manifest = record.get("files")
    if manifest is None:
        return {COMPLETION_MARK: f"{checkpoint / COMPLETION_MARK} lists no files and settings (written by an older "
                                 f"m2rec): its files, data and settings cannot be checked"}
    problems = {}
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            problems[name] = f"{path} is missing"
        elif path.stat().st_size != expected["bytes"]:
            problems[name] = (f"{path} is truncated or altered ({path.stat().st_size} bytes, "
                              f"{expected['bytes']} written)")
        elif file_identity(path)["sha256"] != expected["sha256"]:
            problems[name] = f"{path} does not match the checksum written with it"
    for process in range(num_processes):
        name = f"random_states_{process}.pkl"
        if name not in manifest:
            problems[name] = f"{checkpoint} has no RNG state for process {process}"
    return problems


def inexact_resume_possible(problems: dict[str, str]) -> bool:
    """RNG states can be given up (the run continues from fresh seeds), and a checkpoint of an older m2rec can be
    loaded unchecked; a model or optimizer state cannot be made up."""
    return all(name.startswith("random_states_") or name == COMPLETION_MARK for name in problems)


def promote_checkpoint(output_dir: Path, checkpoint: Path) -> None:
    """Finish an interrupted swap: the checkpoint resumed from becomes checkpoint/. The others are older or
    incomplete; removing them first keeps `checkpoint` intact if this is killed half-way."""
    final = output_dir / CHECKPOINT
    if checkpoint == final:
        return
    for name in CHECKPOINT_CANDIDATES:
        if output_dir / name != checkpoint:
            shutil.rmtree(output_dir / name, ignore_errors=True)
    checkpoint.rename(final)


def recover_best(output_dir: Path, best_epoch: int) -> None:
    """Finish an interrupted swap of best/: a kill between `replace_directory`'s renames leaves no best/, the
    previous best as best.old/ and the new one as best.tmp/. The checkpoint resumed from was saved before that
    swap began, so best.old/ (its `best_epoch`) is the one that belongs to it; the redone epoch saves the new one."""
    best = output_dir / "best"
    if best.exists() or best_epoch == 0:
        return
    for candidate in (output_dir / "best.old", output_dir / "best.tmp"):
        try:
            candidate_epoch = json.loads((candidate / "training_info.json").read_text())["best_epoch"]
        except (OSError, ValueError, KeyError):
            continue
        if candidate_epoch == best_epoch:
            candidate.rename(best)
            logger.warning("restored %s (best epoch %d) from %s, left by an interrupted save", best, best_epoch,
                           candidate.name)
            return
    raise RunFolderError(f"--resume true: {best} (the model of epoch {best_epoch}) is missing, and no best.old/ or "
                         f"best.tmp/ of that epoch was found")


def changed_settings(record: dict, settings: dict, data_fingerprint: str, defaults: dict | None = None) -> dict:
    """{name: [checkpoint's value, this call's value]} for what the checkpoint fixes and this call changes;
    "data" when the data's fingerprint differs. A checkpoint of an older m2rec recorded neither: nothing to compare
    (`checkpoint_problems` reports it). A setting newer than the checkpoint is unchanged at its value in `defaults`."""
    if "settings" not in record:
        return {}
    saved = {**{name: value for name, value in (defaults or {}).items() if name in settings}, **record["settings"]}
    changes = {name: [saved.get(name), settings.get(name)] for name in sorted(set(saved) | set(settings))
               if name not in RESUMABLE_CHANGES and saved.get(name) != settings.get(name)}
    if record.get("data_fingerprint") != data_fingerprint:
        changes[DATA] = [record.get("data_fingerprint"), data_fingerprint]
    return changes


def refuse_unapproved_changes(changes: dict, overrides: list[str] | None, settings: dict) -> None:
    """Raise unless every change is named in --resume_override (names may also be given comma-separated)."""
    approved = {name.strip() for entry in overrides or [] for name in entry.split(",") if name.strip()}
    unknown = sorted(approved - set(settings) - {DATA})
    if unknown:
        raise RunFolderError(f"--resume_override: unknown setting(s) {unknown}; use setting names or '{DATA}'")
    refused = {name: values for name, values in changes.items() if name not in approved}
    if refused:
        listed = "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, (old, new) in refused.items())
        raise RunFolderError(
            f"--resume true: this call changes what the checkpoint fixes ({listed}). Resume with the checkpoint's "
            f"settings, or allow the change with --resume_override {','.join(refused)}.")


class _DropRecords(logging.Filter):
    def __init__(self, below_level: int = 0, phrases: tuple[str, ...] = ()):
        super().__init__()
        self.below_level, self.phrases = below_level, phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # accelerate prefixes "[RANK i] "
        return not (record.levelno < self.below_level or any(phrase in message for phrase in self.phrases))


# Accelerate logs every saved and loaded file (and FSDP state) at INFO, and a WARNING about the tied item embedding at
# every save; both repeat each epoch and say nothing the run's own lines do not.
_CHECKPOINT_CHATTER = {
    "accelerate.checkpointing": _DropRecords(below_level=logging.WARNING),
    "accelerate.accelerator": _DropRecords(phrases=("Saving current state to", "Loading states from",
                                                          "custom states", "FSDP model", "FSDP Model",
                                                          "FSDP Optimizer")),
    "accelerate.utils.other": _DropRecords(phrases=("Removed shared tensor",)),
    "accelerate.utils.fsdp_utils": _DropRecords(below_level=logging.WARNING),  # a line per sharded state saved
}


@contextmanager
def quiet_checkpointing():
    """Within the block, drop accelerate's per-file save/load INFO lines and its shared-tensor warning."""
    for name, chatter in _CHECKPOINT_CHATTER.items():
        logging.getLogger(name).addFilter(chatter)
    try:
        yield
    finally:
        for name, chatter in _CHECKPOINT_CHATTER.items():
            logging.getLogger(name).removeFilter(chatter)
