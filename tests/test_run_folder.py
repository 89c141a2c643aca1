"""A run folder is never lost or mixed: refusal, archive, lock, checkpoint discovery, exact-or-error resume, and
the log lines a person reads. One tiny finished run is copied into each scenario."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from m2rec.training.run_folder import (RunFolderError, RunLock, changed_settings, checkpoint_problems,
                                       find_checkpoint, refuse_unapproved_changes)

from test_train import read_jsonl, run_cli, small_args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-epoch run, its command's output, and the folder it ran in (for the shared data cache)."""
    root = tmp_path_factory.mktemp("runs")
    result = run_cli("m2rec.training.train", small_args(root, "base", epochs=1), root)
    return root, result


def copy_of(finished_run, name):
    root, _ = finished_run
    shutil.copytree(root / "base", root / name)
    return root, root / name


def test_a_run_logs_each_epoch_and_a_summary_without_checkpoint_chatter(finished_run):
    root, result = finished_run
    assert "epoch 1/1: train loss" in result.stderr and "validation HR@10" in result.stderr
    assert "batch: 64 sequences per optimizer step = 64 per process x 1 processes" in result.stderr
    for chatter in ("Saving current state", "Removed shared tensor", "Model weights saved in", "Random states"):
        assert chatter not in result.stderr
    summary = result.stdout
    assert "protocol: leave-one-out" in summary and "full ranking over all 120 items" in summary
    assert "earlier items kept in the ranking" in summary
    assert any(line.startswith("test:") and "NDCG@10" in line for line in summary.splitlines())
    tensorboard_runs = list((root / "base" / "logs").iterdir())
    assert len(tensorboard_runs) == 1 and f"TensorBoard: {tensorboard_runs[0]}" in summary
    assert f"metrics:     {root / 'base' / 'metrics.jsonl'}" in summary
    assert f"model:       {root / 'base' / 'best'}" in summary
    assert not (root / "base" / ".lock").exists()  # released at the end


def test_a_folder_holding_a_run_is_refused_then_archived_by_overwrite(finished_run):
    root, run = copy_of(finished_run, "again")
    old_metrics = (run / "metrics.jsonl").read_bytes()
    old_logs = sorted(p.name for p in (run / "logs").iterdir())

    refused = run_cli("m2rec.training.train", small_args(root, "again", epochs=1), root, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "already holds a run (metrics.jsonl, best, checkpoint)" in refused.stderr
    assert "--resume true" in refused.stderr and "--overwrite_output_dir true" in refused.stderr
    assert (run / "metrics.jsonl").read_bytes() == old_metrics

    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    locked = run_cli("m2rec.training.train", small_args(root, "again", epochs=1) + ["--overwrite_output_dir", "true"],
                     root, check=False)
    assert locked.returncode != 0 and f"in use by another run (pid {os.getpid()}" in locked.stderr
    (run / ".lock").unlink()

    run_cli("m2rec.training.train", small_args(root, "again", epochs=1) + ["--overwrite_output_dir", "true"], root)
    (archive,) = (run / "archive").iterdir()
    assert (archive / "metrics.jsonl").read_bytes() == old_metrics
    assert sorted(p.name for p in (archive / "logs").iterdir()) == old_logs
    assert {"best", "checkpoint"} <= {p.name for p in archive.iterdir()}
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert len(list((run / "logs").iterdir())) == 1  # the new run's own TensorBoard run


def test_resume_refuses_changes_and_inexact_states_then_records_what_it_was_allowed(finished_run):
    root, run = copy_of(finished_run, "resumed")
    metrics = (run / "metrics.jsonl").read_bytes()
    random_states = run / "checkpoint" / "random_states_0.pkl"
    random_states.write_bytes(random_states.read_bytes()[:20])
    # A kill between replace_directory's two renames leaves the newest checkpoint as checkpoint.tmp alone.
    (run / "checkpoint").rename(run / "checkpoint.tmp")
    # Learning rate 0 freezes the weights: validation cannot improve, and patience 1 then ends the run.
    resume = small_args(root, "resumed", epochs=5, patience=1) + ["--resume", "true", "--learning_rate", "0"]

    changed = run_cli("m2rec.training.train", resume + ["--synthetic_seed", "1"], root, check=False)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "learning_rate: 0.003 in the checkpoint, 0.0 now" in changed.stderr and "data: " in changed.stderr
    assert "--resume_override learning_rate,synthetic_seed,data" in changed.stderr

    resume += ["--resume_override", "learning_rate"]
    inexact = run_cli("m2rec.training.train", resume, root, check=False)
    assert inexact.returncode != 0 and "Traceback" not in inexact.stderr
    assert f"{run / 'checkpoint.tmp' / 'random_states_0.pkl'} is truncated" in inexact.stderr
    assert "--resume_inexact true" in inexact.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert not (run / ".lock").exists()  # released on errors too

    result = run_cli("m2rec.training.train", resume + ["--resume_inexact", "true"], root)
    assert "early stopping after epoch 2" in result.stderr
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["valid"] == records[0]["valid"]  # the overridden rate took effect: nothing moved
    resumed = records[1]["resumed"]
    assert resumed["checkpoint"] == "checkpoint.tmp" and resumed["overridden"] == {"learning_rate": [0.003, 0.0]}
    assert "random_states_0.pkl is truncated" in resumed["inexact"][0]
    info = json.loads((run / "best" / "training_info.json").read_text())
    assert info["resumes"] == [resumed] and info["train_config"]["learning_rate"] == 0.003  # best is epoch 1's
    optimizer = torch.load(run / "checkpoint" / "optimizer.bin", weights_only=False)
    assert {group["lr"] for group in optimizer["param_groups"]} == {0.0}
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    assert [p.name for p in (run / "logs").iterdir()] == [p.name for p in (root / "base" / "logs").iterdir()]


def write_checkpoint(path, epoch, files=None):
    path.mkdir()
    for name, content in (files or {}).items():
        (path / name).write_bytes(content)
    (path / "trainer_state.json").write_text(json.dumps({"state": {"epoch": epoch}, "files": {}}))


def test_find_checkpoint_takes_the_newest_complete_one_and_names_what_it_found(tmp_path):
    write_checkpoint(tmp_path / "checkpoint.old", epoch=2)
    write_checkpoint(tmp_path / "checkpoint.tmp", epoch=3)
    assert find_checkpoint(tmp_path)[0] == tmp_path / "checkpoint.tmp"
    (tmp_path / "checkpoint.tmp" / "trainer_state.json").unlink()  # killed while saving epoch 3
    assert find_checkpoint(tmp_path)[0] == tmp_path / "checkpoint.old"
    (tmp_path / "checkpoint.old" / "trainer_state.json").write_text('{"sta')
    with pytest.raises(RunFolderError, match=r"checkpoint.tmp/ \(incomplete: no trainer_state.json\); "
                                             r"checkpoint.old/ \(unreadable trainer_state.json"):
        find_checkpoint(tmp_path)
    with pytest.raises(RunFolderError, match=r"found: nothing"):
        find_checkpoint(tmp_path / "elsewhere")


def test_checkpoint_problems_name_truncated_altered_and_missing_files(tmp_path):
    from m2rec.training.run_folder import file_identity, inexact_resume_possible

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(b"0123456789")
    record = {"files": {p.name: file_identity(p) for p in checkpoint.iterdir()}}
    assert checkpoint_problems(checkpoint, record, num_processes=1) == {}
    (checkpoint / "random_states_0.pkl").unlink()
    problems = checkpoint_problems(checkpoint, record, num_processes=2)
    assert problems == {"random_states_0.pkl": f"{checkpoint / 'random_states_0.pkl'} is missing",
                        "random_states_1.pkl": f"{checkpoint} has no RNG state for process 1"}
    assert inexact_resume_possible(problems)  # fresh seeds can replace lost RNG states
    (checkpoint / "model.safetensors").write_bytes(b"01234")
    (checkpoint / "optimizer.bin").write_bytes(b"abcdefghij")
    problems = checkpoint_problems(checkpoint, record, num_processes=1)
    assert problems["model.safetensors"] == f"{checkpoint / 'model.safetensors'} is truncated or altered " \
                                            f"(5 bytes, 10 written)"
    assert problems["optimizer.bin"] == f"{checkpoint / 'optimizer.bin'} does not match the checksum written with it"
    assert not inexact_resume_possible(problems)  # weights cannot be made up


def test_resume_settings_that_may_change_pass_and_fixed_ones_need_an_override():
    saved = {"settings": {"learning_rate": 0.001, "num_train_epochs": 10, "hidden_size": 64},
             "data_fingerprint": "abc"}
    now = {"learning_rate": 0.001, "num_train_epochs": 20, "hidden_size": 64}
    assert changed_settings(saved, now, "abc") == {}
    changes = changed_settings(saved, {**now, "hidden_size": 32}, "abd")
    assert changes == {"hidden_size": [64, 32], "data": ["abc", "abd"]}
    with pytest.raises(RunFolderError, match=r"hidden_size: 64 in the checkpoint, 32 now; data: 'abc'"):
        refuse_unapproved_changes(changes, None, now)
    refuse_unapproved_changes(changes, ["hidden_size,data"], now)
    with pytest.raises(RunFolderError, match=r"unknown setting\(s\) \['hiden_size'\]"):
        refuse_unapproved_changes(changes, ["hiden_size", "data"], now)

    # A setting that a checkpoint of an older m2rec lacks is unchanged at its default, changed at another value.
    defaults = {"learning_rate": 0.001, "max_grad_norm": None}
    assert changed_settings(saved, {**now, "max_grad_norm": None}, "abc", defaults) == {}
    assert changed_settings(saved, {**now, "max_grad_norm": 1.0}, "abc", defaults) == {"max_grad_norm": [None, 1.0]}


def test_lock_refuses_a_live_run_takes_over_a_stale_one_and_releases(tmp_path, caplog):
    path = tmp_path / ".lock"
    live = {"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier"}
    path.write_text(json.dumps(live))
    with pytest.raises(RunFolderError, match=f"pid {os.getppid()} on host {socket.gethostname()}"):
        RunLock(path).acquire()
    path.write_text(json.dumps({**live, "host": "another-host"}))
    with pytest.raises(RunFolderError, match="another-host"):
        RunLock(path).acquire()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({**live, "pid": int(finished.stdout)}))
    lock = RunLock(path)
    lock.acquire()
    assert "stale lock" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_resume_restores_best_from_an_interrupted_swap(tmp_path):
    from m2rec.training.run_folder import recover_best

    for name, epoch in (("best.old", 2), ("best.tmp", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_info.json").write_text(json.dumps({"best_epoch": epoch}))
    recover_best(tmp_path, best_epoch=2)  # the checkpoint was saved before the swap to epoch 3's model began
    assert json.loads((tmp_path / "best" / "training_info.json").read_text())["best_epoch"] == 2
    shutil.rmtree(tmp_path / "best")
    with pytest.raises(RunFolderError, match="model of epoch 2\\) is missing"):
        recover_best(tmp_path, best_epoch=2)


def test_claim_starts_a_resume_of_nothing_and_refuses_contradictory_flags(tmp_path, caplog):
    from m2rec.training.run_folder import claim_run_folder

    with pytest.raises(RunFolderError, match="contradict"):
        claim_run_folder(tmp_path / "run", RunLock(tmp_path / "run.lock"), resume=True, overwrite=True)
    (tmp_path / "run" / "logs" / "run-killed-in-epoch-1").mkdir(parents=True)  # TensorBoard files alone
    lock = RunLock(tmp_path / "run" / ".lock")
    # One command both starts and continues a run (bench/reproduce.py always passes --resume true).
    assert claim_run_folder(tmp_path / "run", lock, resume=True, overwrite=False) is False
    assert "holds no run yet" in caplog.text and lock.held
    lock.release()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert claim_run_folder(tmp_path / "run", lock, resume=False, overwrite=True) is False
    lock.release()
    (archive,) = (tmp_path / "run" / "archive").iterdir()
    assert sorted(p.name for p in archive.iterdir()) == ["logs", "metrics.jsonl"]
