"""bench/reproduce.py on a dataset of the user's own (a config file), with the SASRec baseline's size chosen."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

REPRODUCE = Path(__file__).resolve().parent.parent / "bench" / "reproduce.py"


def run_reproduce(args, tmp_path):
    return subprocess.run([sys.executable, str(REPRODUCE), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_any_config_and_the_sasrec_size(tmp_path):
    config = tmp_path / "my-data.yaml"
    config.write_text(yaml.safe_dump({
        "format": "synthetic", "synthetic_users": 120, "synthetic_items": 50, "max_len": 20, "seed": 0,
        "train_batch_size": 64, "eval_batch_size": 128, "num_train_epochs": 1}))
    result = run_reproduce(["my-data/sasrec", "--config", str(config), "--runs-root", "runs",
                            "--sasrec-layers", "1", "--sasrec-heads", "1", "--seen_item_bias", "true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert row["experiment"] == "my-data/sasrec" and "--sasrec-layers 1" in row["command"]
    assert row["config"]["synthetic_users"] == 120 and row["config"]["fusion"] == "none"
    saved = json.loads((tmp_path / "runs" / "my-data" / "sasrec" / "best" / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["num_attention_heads"], saved["seen_item_bias"]) == (1, 1, True)
    with safe_open(tmp_path / "runs" / "my-data" / "sasrec" / "best" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("seen_item_offset").item() != 0  # trained from its initial 0
    assert 0 <= row["test"]["NDCG@10"] <= 1


def test_unknown_dataset_or_variant_is_named(tmp_path):
    result = run_reproduce(["my-data/m2rec", "--runs-root", "runs"], tmp_path)
    assert result.returncode != 0 and "unknown dataset 'my-data'" in result.stderr and "--config" in result.stderr
    result = run_reproduce(["ml-1m/transformer", "--runs-root", "runs"], tmp_path)
    assert result.returncode != 0 and "unknown variant 'transformer'" in result.stderr


def test_text_neighbours_groups_users_by_the_text_of_target_and_last_item(tmp_path):
    """bench/text_neighbours.py on two runs of one dataset: every user in one group, each model's overall NDCG@10 the
    history-removed number its run reported; runs of other data and runs without text are refused."""
    config = tmp_path / "my-data.yaml"
    config.write_text(yaml.safe_dump({
        "format": "synthetic", "synthetic_users": 150, "synthetic_items": 60, "max_len": 20, "seed": 0,
        "train_batch_size": 64, "eval_batch_size": 128, "num_train_epochs": 2}))
    for variant in ("m2rec", "sasrec"):
        result = run_reproduce([f"my-data/{variant}", "--config", str(config), "--runs-root", "runs"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = {json.loads(line)["experiment"]: json.loads(line)
            for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()}
    runs = [tmp_path / "runs" / "my-data" / variant for variant in ("m2rec", "sasrec")]
    text_neighbours = importlib.import_module("bench.text_neighbours")
    table = text_neighbours.main([*map(str, runs), "--out", str(tmp_path / "neighbours.json")])
    report = json.loads((tmp_path / "neighbours.json").read_text())
    assert sum(group["users"] for group in report["groups"]) == 150 and len(report["groups"]) == 5
    for run in runs:
        reported = rows[f"my-data/{run.name}"]["test"]["history_excluded/NDCG@10"]
        assert abs(report["models"][str(run)]["NDCG@10"] - reported) < 1e-6
        assert 0 <= report["models"][str(run)]["close_in_top10"] <= 10
    assert "| all | 150 |" in table

    info_file = runs[1] / "best" / "training_info.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "data_fingerprint": "other"}))
    with pytest.raises(SystemExit, match="different data"):
        text_neighbours.main(list(map(str, runs)))
    info_file.write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="none of the runs has item text"):
        text_neighbours.main([str(runs[1])])
