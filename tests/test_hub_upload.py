"""m2rec-push: the repository folder, the model card, verification and its refusals, and the upload round trip with the
real huggingface_hub client through a stand-in Hub on 127.0.0.1 (tests/hub_server.py). Nothing leaves this machine."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save_file

import m2rec
from hub_server import StandInHub
from m2rec.hub_upload import push, verify
from m2rec.hub_upload.model_card import build_model_card
from m2rec.hub_upload.push import PushError, UploadError, build_repo_folder, load_source_model, main, upload
from m2rec.hub_upload.verify import SCORE_TOLERANCE, VerificationError, check_imports, reference_histories, verify_folder
from m2rec import M2RecConfig, M2RecForSequentialRecommendation

NUM_ITEMS, MAX_LEN = 30, 16
REPO_ID = "someone/m2rec-tiny"
TOKEN = "hf_stand_in_token_0123456789"
CODE_FILES = {path.name for path in Path(m2rec.__file__).parent.glob("*.py")} - {"__init__.py"}
# The item vocabulary's and the pipeline's files: m2rec-push ships them, a model's own save_pretrained does not.
MODEL_CODE_FILES = CODE_FILES - {"tokenization_m2rec.py", "pipeline_m2rec.py"}
TEST_METRICS = {f"{name}@{k}": round(0.05 * i + 0.001 * k, 6)
                for i, name in enumerate(("HR", "NDCG", "MRR"), start=1) for k in (5, 10, 20)}
TRAINING_INFO = {
    "dataset": "ml-1m",
    "data_format": "movielens",
    "text_encoder": "BAAI/bge-large-en-v1.5",
    "train_command": "m2rec-train --config training/configs/ml-1m.yaml --seed 7",
    "train_config": {"learning_rate": 0.001, "batch_size": 2048, "max_len": MAX_LEN, "model": {"hidden_size": 16}},
    "seed": 7,
    "exclude_history": False,
    "metrics": {"validation": {"HR@10": 0.25, "NDCG@10": 0.125}, "test": TEST_METRICS},
    "best_epoch": 3,
    "num_users": 50,
    "num_items": NUM_ITEMS,
}


def make_run_folder(path, training_info=TRAINING_INFO):
    """A trainer's best/ folder: save_pretrained output of a model moved by a few optimizer steps, the item map
    (raw ids deliberately unlike the model ids) and training_info.json."""
    torch.manual_seed(0)
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16,
                                                         state_size=8, text_embedding_dim=8))
    text = torch.randn(NUM_ITEMS + 1, 8)
    text[0] = 0
    model.set_text_embeddings(text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        input_ids = torch.randint(1, NUM_ITEMS + 1, (8, MAX_LEN))
        model(input_ids, labels=torch.randint(1, NUM_ITEMS + 1, (8,))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    (path / "item_id_map.json").write_text(json.dumps({str(2000 + 7 * i): i for i in range(1, NUM_ITEMS + 1)}))
    (path / "training_info.json").write_text(json.dumps(training_info, indent=2))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run folder, repository folder built and verified from it, source model, verification summary."""
    root = tmp_path_factory.mktemp("push")
    run_dir = make_run_folder(root / "best")
    folder = root / "repo"
    model = build_repo_folder(run_dir, folder, REPO_ID)
    summary = verify_folder(folder, model)
    return run_dir, folder, model, summary


@pytest.fixture(autouse=True)
def hub_reachable(monkeypatch):
    """These tests reach only stand-in Hubs on 127.0.0.1 (or a closed port there), so they hold under
    HF_HUB_OFFLINE=1 too, as CI runs them; huggingface_hub reads the variable once, at import."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def copy_of(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(tmp_path, **extra):
    """Environment of a fresh process: no HF_* settings or PYTHONPATH from outside, an empty Hub cache."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_") and key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def source_scores(run_dir):
    input_ids = reference_histories(NUM_ITEMS, MAX_LEN)
    with torch.no_grad():
        return input_ids, load_source_model(run_dir)(input_ids, last_position_only=True).logits


# ---------------------------------------------------------------------------------------------------- folder and card


def test_repository_folder_holds_safetensors_code_map_info_and_card(built):
    run_dir, folder, _, summary = built
    files = {path.name for path in folder.iterdir()}
    assert files == {"README.md", "config.json", "model.safetensors", "item_id_map.json", "tokenizer_config.json",
                     "training_info.json"} | CODE_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_m2rec.M2RecConfig",
                                  "AutoModel": "modeling_m2rec.M2RecForSequentialRecommendation"}
    assert config["custom_pipelines"]["sequential-recommendation"]["impl"] == \
        "pipeline_m2rec.SequentialRecommendationPipeline"
    for name in ("item_id_map.json", "training_info.json"):  # copied byte for byte
        assert (folder / name).read_bytes() == (run_dir / name).read_bytes()
    assert summary["python_files"] == sorted(CODE_FILES)
    assert summary["max_difference"] <= SCORE_TOLERANCE


def test_model_card_metadata_and_body_come_from_training_info(built):
    _, folder, _, _ = built
    text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert {"sequential-recommendation", "recommender-system", "mamba", "m2rec"} <= set(data.tags)
    assert data.get("pipeline_tag") is None  # the Hub has no sequential-recommendation task
    assert data.datasets == ["ml-1m"] and data.license == "apache-2.0"
    results = {result.metric_name: result.metric_value for result in data.eval_results}
    assert results == TEST_METRICS  # every test metric, with the JSON's exact values
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("sequential-recommendation", "ml-1m", "test")}
    assert "model-index" in yaml.safe_load(text.split("---")[1])
    body = card.text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    assert "item_id_map.json" in body and "recommend(" in body
    assert TRAINING_INFO["train_command"] in body and "learning_rate: 0.001" in body
    assert "leave-one-out" in body and "exclude_history: false" in body
    assert "BAAI/bge-large-en-v1.5" in body
    assert "C++ compiler" in body and "m2rec-build-kernels" in body and "M2REC_DISABLE_FUSED_CPU=1" in body
    assert "GroupLens" in body and "redistribut" in body  # MovieLens terms stated in the limits
    assert "| HR@10 | 0.0600 | 0.2500 |" in body


def test_model_card_with_missing_optional_keys_reports_no_metrics():
    config = M2RecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN).to_dict()
    item_id_map = {str(i): i for i in range(1, NUM_ITEMS + 1)}
    text = build_model_card("a/b", config, {}, item_id_map)
    card = ModelCard(text)
    assert card.data.eval_results is None and "model-index" not in text
    assert "No metrics were recorded" in text and "not recorded" in text
    assert card.data.license == "apache-2.0" and "default" in text

    only_validation = {"dataset": "synthetic", "metrics": {"validation": {"NDCG@10": 0.3}}, "license": "mit"}
    card = ModelCard(build_model_card("a/b", config, only_validation, item_id_map))
    assert card.data.eval_results is None and card.data.license == "mit"
    assert "| NDCG@10 | – | 0.3000 |" in card.text and "GroupLens" not in card.text
    assert ModelCard(build_model_card("a/b", config, only_validation, item_id_map, license="other")).data.license \
        == "other"  # the CLI flag wins over training_info


# ---------------------------------------------------------------------------------------------------- refusals


def test_refuses_code_that_imports_outside_torch_and_transformers(built, tmp_path):
    folder = copy_of(built[1], tmp_path)
    modeling = folder / "modeling_m2rec.py"
    modeling.write_text("import requests\nfrom numpy import linalg\n" + modeling.read_text())
    with pytest.raises(VerificationError) as error:
        verify_folder(folder, built[2])
    message = str(error.value)
    assert "modeling_m2rec.py line 1 imports 'requests'" in message and "line 2 imports 'numpy'" in message


def test_import_rule_matches_transformers_remote_code_loader(tmp_path):
    (tmp_path / "guarded.py").write_text(textwrap.dedent("""
        import os, torch
        from transformers import PreTrainedModel
        from .sibling import thing
        try:
            from mamba_ssm import selective_scan_fn
        except ImportError:
            selective_scan_fn = None
        if is_mamba_ssm_available():
            import mamba_ssm
    """))
    assert check_imports(tmp_path) == []
    (tmp_path / "unguarded.py").write_text(textwrap.dedent("""
        import configuration_m2rec

        def fast_path():
            import causal_conv1d
    """))
    problems = check_imports(tmp_path)  # transformers scans function bodies too, and absolute sibling imports fail
    assert len(problems) == 2 and "'configuration_m2rec'" in problems[0] and "'causal_conv1d'" in problems[1]


def test_refuses_a_folder_whose_weights_score_differently(built, tmp_path):
    folder = copy_of(built[1], tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["m2rec.item_embeddings.weight"][1:] += 0.05
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="scores 4 fixed histories differently"):
        verify_folder(folder, built[2])


def test_refuses_a_vocabulary_whose_pipeline_does_not_recommend_what_the_model_does(built, tmp_path):
    """A vocabulary that cuts histories shorter than the model's max_len changes what the pipeline recommends."""
    folder = copy_of(built[1], tmp_path)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 2}))
    with pytest.raises(VerificationError, match="pipeline, in a fresh process, does not recommend the source model"):
        verify_folder(folder, built[2])


def test_refuses_pickle_files(built, tmp_path):
    folder = copy_of(built[1], tmp_path)
    torch.save({"weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(VerificationError, match="pytorch_model.bin is a pickle-format file"):
        verify_folder(folder, built[2])
    run_dir = copy_of(built[0], tmp_path / "run")
    (run_dir / "model.safetensors").rename(run_dir / "pytorch_model.bin")
    with pytest.raises(PushError, match="no model.safetensors"):
        build_repo_folder(run_dir, tmp_path / "out", REPO_ID)


def test_refuses_weights_that_do_not_fit_the_code(built, tmp_path):
    run_dir = copy_of(built[0], tmp_path)
    weights = load_file(run_dir / "model.safetensors")
    del weights["m2rec.text_embeddings"]
    save_file(weights, run_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PushError, match="does not fit .*config.json.*missing.*m2rec.text_embeddings"):
        build_repo_folder(run_dir, tmp_path / "out", REPO_ID)


def test_cli_refuses_bad_arguments_before_building(built, tmp_path, capsys):
    assert main(["--model", str(built[0]), "--repo-id", "no-namespace", "--dry-run"]) == 2
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("left over")
    assert main(["--model", str(built[0]), "--repo-id", REPO_ID, "--dry-run", "--output-dir",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "invalid --repo-id 'no-namespace'" in err and "is not empty" in err


def test_refuses_run_folder_without_a_valid_item_map(built, tmp_path, capsys):
    run_dir = copy_of(built[0], tmp_path)
    (run_dir / "item_id_map.json").unlink()
    assert main(["--model", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "missing item_id_map.json" in err and "nothing was uploaded" in err and "Traceback" not in err
    (run_dir / "item_id_map.json").write_text(json.dumps({"a": 1, "b": 1}))
    with pytest.raises(PushError, match="exactly one raw id to each model id"):
        build_repo_folder(run_dir, tmp_path / "out", REPO_ID)


def code_that_leaves_a_marker(marker):
    """A line of Python that, if it ever runs, creates `marker` (a stand-in for `import os; os.system(...)`)."""
    return f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"


def test_push_refuses_a_run_folder_whose_code_differs_and_never_runs_it(built, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(built[0], tmp_path)
    marker = tmp_path / "marker"
    modeling = run_dir / "modeling_m2rec.py"
    modeling.write_text(code_that_leaves_a_marker(marker) + modeling.read_text())
    assert main(["--model", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"the code files modeling_m2rec.py in {run_dir} differ from the installed m2rec's" in err
    assert "never runs code from the folder it publishes" in err and "Traceback" not in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with StandInHub(token=TOKEN) as hub:
        assert main(["--model", str(run_dir), "--repo-id", REPO_ID, "--endpoint", hub.url]) == 1
    assert hub.requests == [] and "modeling_m2rec.py" in capsys.readouterr().err
    assert not marker.exists()


def test_verification_refuses_code_unlike_the_installed_package_before_loading_it(built, tmp_path):
    folder = copy_of(built[1], tmp_path)
    marker = tmp_path / "marker"
    modeling = folder / "modeling_m2rec.py"
    modeling.write_text(code_that_leaves_a_marker(marker) + modeling.read_text())
    (folder / "extra.py").write_text("VALUE = 1\n")
    with pytest.raises(VerificationError, match=r"the code files extra.py, modeling_m2rec.py differ from the "
                                                r"installed m2rec's"):
        verify_folder(folder, built[2])
    assert not marker.exists()


def test_fresh_load_runs_without_any_token_variable(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "GITHUB_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    seen = {}

    def record_child(command, **kwargs):
        seen.update(kwargs)
        return subprocess.CompletedProcess(command, returncode=1, stdout="", stderr="stopped by the test")

    monkeypatch.setattr(verify.subprocess, "run", record_child)
    with pytest.raises(VerificationError, match="stopped by the test"):
        verify.fresh_load_scores(tmp_path, reference_histories(NUM_ITEMS, MAX_LEN))
    env = seen["env"]
    assert [name for name in env if "TOKEN" in name.upper()] == [] and TOKEN not in env.values()
    assert env["HF_HUB_OFFLINE"] == "1" and Path(env["HF_HOME"]).parent == Path(seen["cwd"])  # scratch: no saved token


def test_push_refuses_truncated_or_non_finite_weights_naming_the_file_and_tensors(built, tmp_path, capsys):
    run_dir = copy_of(built[0], tmp_path)
    weights_path = run_dir / "model.safetensors"
    intact = weights_path.read_bytes()
    weights_path.write_bytes(intact[: len(intact) // 2])
    assert main(["--model", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {weights_path}" in err and "truncated" in err and "Traceback" not in err

    weights_path.write_bytes(intact)
    weights = load_file(weights_path)
    weights["m2rec.item_embeddings.weight"][3, :2] = float("nan")
    weights["m2rec.fusion.text_weight"].view(-1)[0] = float("inf")
    save_file(weights, weights_path, metadata={"format": "pt"})
    assert main(["--model", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"{weights_path} holds NaN or infinite weights: " in err and "m2rec.fusion.text_weight (1 of " in err
    assert "m2rec.item_embeddings.weight (2 of " in err and "scores" not in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------- CLI and upload


def test_dry_run_verifies_prints_the_files_and_uploads_nothing(built, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token
    with StandInHub(token=TOKEN) as hub:
        code = main(["--model", str(built[0]), "--repo-id", REPO_ID, "--dry-run", "--endpoint", hub.url,
                     "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and hub.requests == []
    assert "verified:" in out and "dry run: nothing uploaded" in out and f"{hub.url}/{REPO_ID}" in out
    for name in {"README.md", "config.json", "model.safetensors", "item_id_map.json"} | CODE_FILES:
        assert f"  {name} " in out
    assert (tmp_path / "out" / "model.safetensors").is_file()  # --output-dir keeps the folder


def test_cli_uploads_and_reports_network_errors_clearly(built, capsys, monkeypatch):
    """The CLI's upload path; verification is stubbed here (the dry-run test above runs it for real), to keep this
    file fast."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(push, "verify_folder", lambda *args, **kwargs: {"python_files": [], "histories": 0,
                                                                        "max_difference": 0.0})
    with StandInHub(token=TOKEN) as hub:
        assert main(["--model", str(built[0]), "--repo-id", REPO_ID, "--private", "--endpoint", hub.url,
                     "--revision", "v1", "--commit-message", "first upload"]) == 0
        assert set(hub.files(REPO_ID, "v1")) == {path.name for path in built[1].iterdir()}
        assert hub.repos[REPO_ID].private
    captured = capsys.readouterr()
    assert "uploaded:" in captured.out and 'revision="v1"' in captured.out

    endpoint = f"http://127.0.0.1:{closed_port()}"
    assert main(["--model", str(built[0]), "--repo-id", REPO_ID, "--endpoint", endpoint]) == 1
    captured = capsys.readouterr()
    assert f"could not reach the Hub at {endpoint}" in captured.err and "Traceback" not in captured.err
    assert "the upload did not complete" in captured.err
    assert TOKEN not in captured.out + captured.err


def test_upload_to_a_branch_and_refused_token(built):
    with StandInHub(token=TOKEN) as hub:
        commit_url = upload(built[1], REPO_ID, endpoint=hub.url, token=TOKEN, revision="experiment",
                            commit_message="try a branch")
        assert commit_url.startswith(f"{hub.url}/{REPO_ID}/commit/")
        assert set(hub.files(REPO_ID, "experiment")) == {path.name for path in built[1].iterdir()}
        assert hub.files(REPO_ID, "main") == {}  # the branch was created from main and main left alone
        with pytest.raises(UploadError, match="HTTP 401"):
            upload(built[1], REPO_ID, endpoint=hub.url, token="hf_wrong")
        with pytest.raises(UploadError, match="exists already and is public, but --private was given"):
            upload(built[1], REPO_ID, endpoint=hub.url, token=TOKEN, private=True)
    with pytest.raises(UploadError, match="could not reach the Hub at http://127.0.0.1:"):
        upload(built[1], REPO_ID, endpoint=f"http://127.0.0.1:{closed_port()}", token=TOKEN)


def recommend_example(readme):
    """The python code block under '## Recommend' of the card, to run it as a user would."""
    section = readme.split("## Recommend", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_round_trip_through_the_stand_in_hub(built, tmp_path):
    """Upload the verified folder with the real client, then load it as a user would: a fresh process, an empty
    cache, the card's own example code; the scores must be identical to the source model's."""
    run_dir, folder, _, _ = built
    input_ids, expected = source_scores(run_dir)
    save_file({"input_ids": input_ids}, tmp_path / "inputs.safetensors")
    with StandInHub(token=TOKEN) as hub:
        upload(folder, REPO_ID, endpoint=hub.url, token=TOKEN)
        published = hub.files(REPO_ID)
        assert published == {path.name: path.read_bytes() for path in folder.iterdir()}

        # A user with an empty cache runs the card's own example, then scores the fixed histories.
        readme = published["README.md"].decode()
        script = recommend_example(readme) + textwrap.dedent("""
            import sys
            from safetensors.torch import load_file, save_file
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert "m2rec" not in sys.modules
            with torch.no_grad():
                logits = model(load_file(sys.argv[1])["input_ids"], last_position_only=True).logits
            save_file({"logits": logits.contiguous()}, sys.argv[2])
        """)
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.safetensors"),
                                 str(tmp_path / "remote.safetensors")], cwd=tmp_path,
                                env=clean_env(tmp_path, HF_ENDPOINT=hub.url), capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    recommended = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    item_id_map = json.loads(published["item_id_map.json"])
    assert len(recommended) == 10 and set(recommended) <= set(item_id_map)
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits"], expected, rtol=0, atol=0)


def test_transformers_push_to_hub_gives_a_loadable_but_incomplete_repository(tmp_path):
    """model.push_to_hub writes config.json with auto_map, the code files and model.safetensors, so the model loads
    with trust_remote_code; but its README is transformers' generic template (no metrics, no usage) and it has no
    item_id_map.json or training_info.json. m2rec-push is the supported way to publish."""
    push_script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        from m2rec import M2RecConfig, M2RecForSequentialRecommendation
        torch.manual_seed(0)
        model = M2RecForSequentialRecommendation(M2RecConfig(num_items={NUM_ITEMS}, max_len={MAX_LEN},
            hidden_size=16, state_size=8, text_embedding_dim=8)).eval()
        text = torch.randn({NUM_ITEMS + 1}, 8)
        text[0] = 0
        model.set_text_embeddings(text)
        input_ids = torch.randint(1, {NUM_ITEMS + 1}, (3, {MAX_LEN}))
        with torch.no_grad():
            logits = model(input_ids, last_position_only=True).logits
        save_file({{"input_ids": input_ids, "logits": logits.contiguous()}}, sys.argv[1])
        model.push_to_hub("someone/pushed")
    """)
    load_script = textwrap.dedent("""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained("someone/pushed", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(load_file(sys.argv[1])["input_ids"], last_position_only=True).logits
        save_file({"logits": logits.contiguous()}, sys.argv[2])
    """)
    repo_root = Path(__file__).resolve().parents[1]
    with StandInHub(token=TOKEN) as hub:
        pushed = subprocess.run([sys.executable, "-c", push_script, str(tmp_path / "expected.safetensors")],
                                cwd=repo_root, env=clean_env(tmp_path / "pusher", HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN),
                                capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        files = hub.files("someone/pushed")
        loaded = subprocess.run([sys.executable, "-c", load_script, str(tmp_path / "expected.safetensors"),
                                 str(tmp_path / "remote.safetensors")], cwd=tmp_path,
                                env=clean_env(tmp_path / "user", HF_ENDPOINT=hub.url), capture_output=True,
                                text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert {"config.json", "model.safetensors", "README.md"} | MODEL_CODE_FILES == set(files)
    assert "auto_map" in json.loads(files["config.json"])
    assert "model-index" not in files["README.md"].decode() and "item_id_map.json" not in files
    expected = load_file(tmp_path / "expected.safetensors")["logits"]
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits"], expected, rtol=0, atol=0)
