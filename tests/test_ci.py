""".ci/run runs the two commands of the README's first bash block: here on stand-in READMEs whose commands are cheap."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def run_ci(tmp_path, *commands):
    """.ci/run in a git checkout whose README's first bash block holds `commands`; returns the finished process."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(REPOSITORY / ".ci" / "run", checkout / ".ci" / "run")
    block = "\n".join(["# a comment", *commands, ""])
    (checkout / "README.md").write_text(f"# Title\n\n```bash\n{block}```\n\n```bash\nnot a command of CI\n```\n")
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    subprocess.run(["git", "-C", str(checkout), "add", "-A"], check=True)
    (checkout / "untracked").write_text("not in a clone")
    return subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_runs_each_command_in_a_fresh_copy_offline_and_returns_the_tests_exit_code(tmp_path):
    main = 'touch made-by-main && test "$HF_HUB_OFFLINE" = 1 && echo "test:  HR@10 0.3  NDCG@10 0.2" # m2rec-train'
    tests = "test -e README.md && test ! -e untracked && test ! -e made-by-main && echo pytest && exit 3"
    result = run_ci(tmp_path, main, tests)
    assert result.returncode == 3, result.stderr
    assert "CI: main job done" in result.stdout and "pytest" in result.stdout
    assert not (tmp_path / "checkout" / "made-by-main").exists()  # the checkout's working tree stays clean


def test_fails_when_the_main_job_prints_no_test_metrics(tmp_path):
    result = run_ci(tmp_path, "echo m2rec-train finished", "echo pytest")
    assert result.returncode == 1
    assert "printed no test metrics" in result.stderr and "CI: tests" not in result.stdout


@pytest.mark.parametrize("commands", [(), ("echo m2rec-train",), ("echo pytest", "echo m2rec-train")])
def test_fails_loudly_when_the_readme_commands_are_not_found(tmp_path, commands):
    result = run_ci(tmp_path, *commands)
    assert result.returncode == 1
    assert "README.md's first bash block must hold two commands" in result.stderr


def test_fails_when_a_pip_command_does_not_pin_the_cpu_torch(tmp_path):
    result = run_ci(tmp_path, 'pip install -e ".[text]" && m2rec-train', "echo pytest")
    assert result.returncode == 1
    assert "must pin the CPU torch" in result.stderr and "CI: main" not in result.stdout
