"""Save/load: safetensors with the text buffer and one copy of the tied weights; Auto classes; remote code offline."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

import m2rec
from m2rec import M2RecForSequentialRecommendation
from test_model import random_histories, tiny_model

# Every module of the remote-code folder but the package's own __init__ (which registers the Auto classes).
CODE_FILES = {name for name in os.listdir(os.path.dirname(m2rec.__file__))
              if name.endswith(".py") and name != "__init__.py"}
# What a model's save_pretrained copies: the model's module and its relative imports. The item vocabulary and the
# pipeline are saved with them by the tokenizer's and the pipeline's save_pretrained (tests/test_pipeline.py).
MODEL_CODE_FILES = CODE_FILES - {"tokenization_m2rec.py", "pipeline_m2rec.py"}


def saved_model(tmp_path, **overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():  # move the weights away from their initial values so a silent re-init would show
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_writes_safetensors_code_and_auto_map(tmp_path):
    model, folder = saved_model(tmp_path)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} | MODEL_CODE_FILES <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_m2rec.M2RecConfig",
                                  "AutoModel": "modeling_m2rec.M2RecForSequentialRecommendation"}
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert "m2rec.text_embeddings" in keys
    assert "m2rec.item_embeddings.weight" in keys and "item_scorer.weight" not in keys  # tied: one copy


def test_round_trip_through_auto_classes(tmp_path):
    model, folder = saved_model(tmp_path)
    loaded = AutoModel.from_pretrained(folder)  # the installed package registered "m2rec"
    assert isinstance(loaded, M2RecForSequentialRecommendation)
    assert AutoConfig.from_pretrained(folder).to_diff_dict() == model.config.to_diff_dict()
    assert loaded.item_scorer.weight is loaded.m2rec.item_embeddings.weight
    torch.testing.assert_close(loaded.m2rec.text_embeddings, model.m2rec.text_embeddings, rtol=0, atol=0)
    for (name, saved), (_, restored) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=name)
    input_ids = random_histories(3, 9)
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_round_trip_of_the_variants(tmp_path):
    for overrides in (dict(fusion="none"), dict(fft_mode="global", fft_adaptive=False), dict(seen_item_bias=True),
                      dict(item_representation="id+text")):
        model, folder = saved_model(tmp_path / str(len(overrides)), **overrides)
        loaded = AutoModel.from_pretrained(folder)
        input_ids = random_histories(2, 7)
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_remote_code_loads_offline_in_a_fresh_process(tmp_path):
    model, folder = saved_model(tmp_path)
    input_ids = random_histories(4, 11)
    input_ids[2, 5:] = 0
    save_file({"input_ids": input_ids, "logits": model(input_ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "m2rec" not in sys.modules, "the installed package was imported: not a remote-code load"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        logits = model(expected["input_ids"]).logits
        save_file({{"logits": logits.contiguous()}}, {str(tmp_path / "remote.safetensors")!r})
        print(type(model).__module__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(tmp_path / "remote.safetensors")["logits"]
    torch.testing.assert_close(remote, load_file(tmp_path / "expected.safetensors")["logits"], rtol=0, atol=0)


def test_remote_code_imports_only_torch_transformers_and_siblings():
    """transformers' remote-code loader imports every unguarded module-level import of these files, so those may
    only be the standard library, torch, transformers and sibling files; the optional CUDA packages must sit inside
    try/except or a function."""
    import ast

    package_dir = os.path.dirname(m2rec.__file__)
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for name in CODE_FILES:
        tree = ast.parse(open(os.path.join(package_dir, name)).read())
        for node in tree.body:  # module level, outside try/except
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} line {node.lineno} imports {roots - allowed} unguarded"
