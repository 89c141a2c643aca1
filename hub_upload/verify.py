"""Checks a repository folder must pass before it is uploaded.

1. Files: the ones a user needs are there, and no pickle-based weight file is (loading a pickle runs arbitrary code).
2. Code: every `.py` file is byte-identical to the installed package's file of that name, so that the fresh load
   below runs exactly the installed code and nothing else (checked before anything loads the folder).
3. Imports: every `.py` file imports only the standard library, torch, transformers and (relatively) its sibling
   files, except inside `try` blocks (DESIGN.md §6). Where it looks follows transformers' remote-code loader
   (`dynamic_module_utils.check_imports`): that scans the *whole* file, function bodies included, skipping only
   `try` blocks and `if is_..._available()` blocks, and refuses to load if any scanned import is missing. So an
   optional CUDA package imported in a function without `try` breaks loading on every machine without that
   package; this check catches it before users do.
4. A fresh load: `AutoModel.from_pretrained(folder, trust_remote_code=True)` in a new Python process, offline, with
   sockets disabled, no Hugging Face token and its own module cache, must score a few fixed histories like the source
   model does; and `pipeline("sequential-recommendation", model=folder, trust_remote_code=True)` there, with the
   folder's item vocabulary, must recommend the raw ids and scores that the source model's `recommend` gives.
"""

import ast
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import modeling_m2rec as installed_modeling

# What every user of a transformers model has. (huggingface_hub and safetensors are installed with transformers too,
# but the project's rule, DESIGN.md §6, is the narrower one, and the model code does not need them.)
ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REQUIRED_FILES = ("config.json", "model.safetensors", "item_id_map.json", "tokenizer_config.json", "training_info.json",
                  "README.md")
# The installed model package, whose files save_pretrained copies next to the weights as remote code.
INSTALLED_CODE = Path(installed_modeling.__file__).resolve().parent

# Scores of the fresh load may differ from the in-process ones by at most SCORE_TOLERANCE · max(1, max |score|).
# Code and weights are byte-identical, so the only legitimate difference is floating-point reduction order (a
# different thread count, or the plain-PyTorch scan where the fused one could not be built), i.e. a few float32
# ulps: ~1e-7 relative. A wrong weight, a re-initialised layer or a code change moves scores by orders of magnitude
# more (1e-3 and up), so 1e-5 separates the two with margin on both sides.
SCORE_TOLERANCE = 1e-5


class VerificationError(Exception):
    """The folder must not be uploaded; the message lists every reason."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("verification failed:\n" + "\n".join(f"  - {problem}" for problem in self.problems))


# ---------------------------------------------------------------------------------------------------- files


def check_files(folder) -> list[str]:
    """Problems with the folder's file list: missing required files, pickle files, a config without auto_map."""
    folder = Path(folder)
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (folder / name).is_file()]
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{path.relative_to(folder)} is a pickle-format file; only safetensors weights are "
                            f"published (loading a pickle can run arbitrary code)")
    if (folder / "config.json").is_file():
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
        for auto_class in ("AutoConfig", "AutoModel"):
            if auto_class not in auto_map:
                problems.append(f"config.json has no auto_map entry for {auto_class}, so "
                                f"AutoModel.from_pretrained(..., trust_remote_code=True) cannot find the code")
                continue
            module = auto_map[auto_class].split("--")[-1].rsplit(".", 1)[0]  # "repo--module.Class" -> "module"
            if not (folder / f"{module}.py").is_file():
                problems.append(f"auto_map[{auto_class!r}] points at {module}.py, which is not in the folder")
        for task, info in (json.loads((folder / "config.json").read_text()).get("custom_pipelines") or {}).items():
            module = str(info.get("impl", "")).rsplit(".", 1)[0]
            if not (folder / f"{module}.py").is_file():
                problems.append(f"custom_pipelines[{task!r}] points at {module}.py, which is not in the folder")
    return problems


# ---------------------------------------------------------------------------------------------------- code


def code_differing_from_installed(folder) -> list[str]:
    """Relative paths of the folder's `.py` files that are not byte-identical to the installed package's file of the
    same name (including files the package does not have). Reads the files; runs nothing."""
    folder = Path(folder)
    differing = []
    for path in sorted(folder.rglob("*.py")):
        name = path.relative_to(folder)
        installed = INSTALLED_CODE / name
        if not installed.is_file() or installed.read_bytes() != path.read_bytes():
            differing.append(name.as_posix())
    return differing


def check_code(folder) -> list[str]:
    """Problems: code files that differ from the installed package's, which the fresh load would otherwise run."""
    differing = code_differing_from_installed(folder)
    if not differing:
        return []
    return [f"the code files {', '.join(differing)} differ from the installed m2rec's ({INSTALLED_CODE}); only the "
            f"installed code is published and loaded (build the folder with m2rec-push, which writes it with "
            f"save_pretrained, and do not edit it)"]


# ---------------------------------------------------------------------------------------------------- imports


def _imports_outside_try(tree):
    """(line, top-level package) of every absolute import that transformers' loader would require."""
    found = []

    def visit(node):
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            return  # optional imports: transformers skips these, so may we
        if isinstance(node, ast.If) and _is_availability_check(node.test):
            return  # `if is_xxx_available():` blocks, skipped by transformers too
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_availability_check(test):
    return any(isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("is_")
               and getattr(node.func, "id", "").endswith("_available") for node in ast.walk(test))


def check_imports(folder) -> list[str]:
    """Problems: absolute imports of anything but the standard library and ALLOWED_PACKAGES, outside `try`.

    Sibling files must be imported relatively (`from .configuration_m2rec import ...`): transformers copies the folder
    into a package of its module cache, where `import configuration_m2rec` would not resolve.
    """
    folder = Path(folder)
    allowed = set(sys.stdlib_module_names) | ALLOWED_PACKAGES
    problems = []
    for path in sorted(folder.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            problems.append(f"{path.name} does not parse: {error}")
            continue
        for line, package in _imports_outside_try(tree):
            if package not in allowed:
                problems.append(f"{path.name} line {line} imports {package!r} outside a try block; the remote code "
                                f"may only import the standard library, {', '.join(sorted(ALLOWED_PACKAGES))} and "
                                f"its own files through relative imports (optional packages go in try/except)")
    return problems


# ---------------------------------------------------------------------------------------------------- fresh load


def reference_histories(num_items: int, max_len: int) -> torch.LongTensor:
    """A fixed batch (4, max_len) of right-padded histories: full length, half, 3 items and 1 item.

    Deterministic without a random generator (so every process builds the same one); ids spread over the whole
    catalogue, 1..num_items.
    """
    lengths = [max_len, max(1, max_len // 2), min(3, max_len), 1]
    input_ids = torch.zeros(len(lengths), max_len, dtype=torch.long)  # (B, L)
    for row, length in enumerate(lengths):
        positions = torch.arange(length)
        input_ids[row, :length] = (positions * 7919 + row * 104729) % num_items + 1
    return input_ids


RECOMMENDED = 5  # how many recommendations per reference history the fresh pipeline must reproduce

# Runs in the fresh process. Sockets are disabled before anything is imported: the remote code must load from the
# folder alone (DESIGN.md §6), and HF_HUB_OFFLINE alone would not catch code that opens a connection itself.
_LOAD_SCRIPT = textwrap.dedent("""
    import json, socket, sys

    def _no_network(*args, **kwargs):
        raise OSError("the remote code tried to open a network connection")

    socket.socket.connect = socket.socket.connect_ex = _no_network
    socket.create_connection = _no_network

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, pipeline

    folder, inputs_path, outputs_path, recommendations_path, num_recommended = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    module = type(model).__module__
    if not module.startswith("transformers_modules"):
        sys.exit(f"{folder} was not loaded from its own code files but from {module}")
    input_ids = load_file(inputs_path)["input_ids"]
    with torch.no_grad():
        scores = model(input_ids, last_position_only=True).logits
    save_file({"scores": scores.contiguous()}, outputs_path)
    recommender = pipeline("sequential-recommendation", model=folder, trust_remote_code=True, device="cpu")
    raw_histories = recommender.tokenizer.batch_decode(input_ids)
    with open(recommendations_path, "w") as file:
        json.dump(recommender(raw_histories, k=int(num_recommended)), file)
""")


def child_environment(scratch) -> dict:
    """The fresh load's environment: offline, Hub and module caches under `scratch`, and no credentials.

    Every variable whose name contains TOKEN is removed (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, which huggingface_hub still
    honours, HF_TOKEN_PATH, and any other service's token), and the empty HF_HOME holds no saved token: the load needs
    none, and code that reads credentials must find nothing to read.
    """
    scratch = Path(scratch)
    env = {name: value for name, value in os.environ.items() if "TOKEN" not in name.upper()}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(scratch / "hf_home"),
               HF_MODULES_CACHE=str(scratch / "modules"))
    return env


def fresh_load_scores(folder, input_ids, timeout=600):
    """Scores (B, I) of the folder loaded by `AutoModel.from_pretrained(folder, trust_remote_code=True)` in a new
    offline process without credentials and with empty Hub and module caches, and the folder's pipeline's
    recommendations for the same histories in raw ids (B lists of RECOMMENDED {"item", "score"}). Raises
    VerificationError with the child's stderr if it fails."""
    with tempfile.TemporaryDirectory(prefix="m2rec-verify-") as scratch:
        scratch = Path(scratch)
        save_file({"input_ids": input_ids.contiguous()}, scratch / "inputs.safetensors")
        command = [sys.executable, "-c", _LOAD_SCRIPT, str(Path(folder).resolve()), str(scratch / "inputs.safetensors"),
                   str(scratch / "scores.safetensors"), str(scratch / "recommendations.json"), str(RECOMMENDED)]
        # cwd=scratch: a `modeling_m2rec` package in the caller's working directory must not be what gets imported.
        result = subprocess.run(command, cwd=scratch, env=child_environment(scratch), capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise VerificationError([f"AutoModel.from_pretrained(folder, trust_remote_code=True) or the folder's "
                                     f"pipeline failed in a fresh offline process:\n{result.stderr.strip()[-3000:]}"])
        recommendations = json.loads((scratch / "recommendations.json").read_text())
        return load_file(scratch / "scores.safetensors")["scores"], recommendations


def score_difference(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |Δ| over real items (column 0, padding, holds the dtype's minimum in both), relative to the scale."""
    if scores.shape != reference.shape:
        return float("inf")
    scale = max(1.0, reference[:, 1:].abs().max().item())
    return (scores[:, 1:].double() - reference[:, 1:].double()).abs().max().item() / scale


def recommendation_difference(recommendations, reference: torch.Tensor, item_id_map: dict[str, int]) -> float:
    """Largest |Δ| relative to the scale between the pipeline's recommendations (per history, [{"item": raw id,
    "score"}]) and the source model's scores (B, I): of each recommended item's score, and of the RECOMMENDED best
    scores (so the recommended items are the best ones, whatever the order of near ties). inf when a raw id is not in
    item_id_map or a history got another number of recommendations."""
    scale = max(1.0, reference[:, 1:].abs().max().item())
    largest = 0.0
    for row_scores, recommended in zip(reference.double(), recommendations):
        model_ids = [item_id_map.get(entry["item"]) for entry in recommended]
        if len(model_ids) != RECOMMENDED or None in model_ids:
            return float("inf")
        pipeline_scores = torch.tensor([entry["score"] for entry in recommended], dtype=torch.float64)
        best = row_scores[1:].topk(RECOMMENDED).values
        largest = max(largest, (pipeline_scores - row_scores[model_ids]).abs().max().item(),
                      (pipeline_scores - best).abs().max().item())
    return largest / scale


def verify_folder(folder, source_model) -> dict:
    """Refuse (raise VerificationError) unless `folder` is complete, pickle-free, holds exactly the installed code,
    imports only what it may, and loads in a fresh offline process with the same scores as `source_model` (the model
    as loaded from the run folder) and a pipeline that recommends what it does. Nothing in the folder runs before the
    code check has passed.

    Returns a summary: {"python_files": [...], "histories": B, "max_difference": float}.
    """
    folder = Path(folder)
    problems = check_files(folder) + check_code(folder) + check_imports(folder)
    if problems:  # no point starting a process for a folder that is refused anyway, and its code must not run
        raise VerificationError(problems)

    config = source_model.config
    input_ids = reference_histories(config.num_items, config.max_len)  # (B, L)
    with torch.no_grad():
        reference = source_model.eval()(input_ids, last_position_only=True).logits  # (B, I)
    scores, recommendations = fresh_load_scores(folder, input_ids)
    difference = score_difference(scores, reference)
    if not difference <= SCORE_TOLERANCE:  # also refuses NaN
        raise VerificationError([f"the repository folder scores {len(input_ids)} fixed histories differently in a "
                                 f"fresh process: max relative |Δscore| = {difference:.3g} > {SCORE_TOLERANCE:g}; its "
                                 f"weights or code differ from the source model's"])
    item_id_map = json.loads((folder / "item_id_map.json").read_text(encoding="utf-8"))
    pipeline_difference = recommendation_difference(recommendations, reference, item_id_map)
    if not pipeline_difference <= SCORE_TOLERANCE:
        raise VerificationError([f"the folder's sequential-recommendation pipeline, in a fresh process, does not "
                                 f"recommend the source model's top {RECOMMENDED} raw ids for {len(input_ids)} fixed "
                                 f"histories (max relative |Δscore| {pipeline_difference:.3g}); its item vocabulary "
                                 f"or pipeline code does not fit the model"])
    return {"python_files": sorted(path.name for path in folder.rglob("*.py")), "histories": len(input_ids),
            "max_difference": difference}
