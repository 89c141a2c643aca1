"""Item text -> sentence embeddings (paper §III-C).

Each item's text ("name, category, description") is rendered from its columns, encoded once by a
sentence encoder and handed to the model as a frozen (num_items + 1, E) buffer. Row 0 (padding) and
items without text are zero vectors, so they contribute nothing through the text branch.

sentence-transformers is an optional dependency (the `text` extra); it is imported only when
texts actually have to be encoded, never on a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

# One home for the recipe, in the model's folder, so that a saved model encodes new items the same way (add_items).
from ..item_text import (BUNDLED_TEXT_ENCODER, BUNDLED_TEXT_ENCODER_HUB_ID, DEFAULT_TEXT_ENCODER,  # noqa: F401
                         encode_texts, format_item_text, loadable_text_encoder, resolve_text_encoder)

logger = logging.getLogger(__name__)


def _cache_file(cache_dir: str | os.PathLike, model_name_or_path: str, texts: list[str]) -> Path:
    # Keyed by the encoder name and the exact texts (with their positions): new items, edited text
    # or another encoder all miss. A local encoder folder is keyed by its path, not its weights.
    digest = hashlib.sha256(json.dumps([model_name_or_path, texts]).encode("utf-8")).hexdigest()
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name_or_path.strip("/"))[-60:]
    return Path(cache_dir).expanduser() / f"text-emb-{safe_name}-{digest[:16]}.npy"


def _load_cached_embeddings(cache_file: Path, num_rows: int) -> Optional[torch.Tensor]:
    """The cached (num_rows, E) array, or None (with a warning naming the file) when it is damaged."""
    try:
        embeddings = np.load(cache_file, allow_pickle=False)
        problem = (None if embeddings.ndim == 2 and embeddings.shape[0] == num_rows and embeddings.dtype == np.float32
                   else f"shape {embeddings.shape} {embeddings.dtype}, expected ({num_rows}, E) float32")
    except (OSError, ValueError, EOFError) as e:
        problem = str(e)
    if problem is not None:
        logger.warning("the cached text embeddings %s are damaged (%s); encoding the texts again", cache_file, problem)
        return None
    logger.info("loading item text embeddings from %s", cache_file)
    return torch.from_numpy(embeddings)


def encode_item_texts(
    item_texts: Sequence[Optional[str]],
    model_name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER,
    cache_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Encode item texts into a (num_items + 1, E) float32 tensor.

    item_texts: index = item id, item_texts[0] is padding; None or "" means "no text".
    Embeddings are L2-normalised. Returns (embeddings, number of items 1..N without text); rows 0
    and rows of items without text are zeros. With `cache_dir` the array is stored as .npy and a
    second call with the same encoder and texts loads it without loading the encoder.
    """
    model_name_or_path = str(model_name_or_path)
    texts = ["" if t is None else t.strip() for t in item_texts]
    texts[0] = ""  # padding never has text
    with_text = [i for i, t in enumerate(texts) if t]
    num_missing = len(texts) - 1 - len(with_text)
    if not with_text:
        raise ValueError(f"none of the {len(texts) - 1} items has text; train without text (fusion='none') instead")
    if num_missing:
        logger.warning("%d of %d items have no text; their text embedding is a zero vector",
                       num_missing, len(texts) - 1)

    cache_file = _cache_file(cache_dir, model_name_or_path, texts) if cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        cached = _load_cached_embeddings(cache_file, len(texts))
        if cached is not None:
            return cached, num_missing

    logger.info("encoding %d item texts with %s", len(with_text), model_name_or_path)
    encoded = encode_texts([texts[i] for i in with_text], model_name_or_path, normalize=True, batch_size=batch_size,
                           device=device, show_progress=show_progress).numpy()  # (number with text, E)
    embeddings = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)  # (I + 1, E)
    embeddings[with_text] = encoded

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write under a temporary name and rename: a killed run or a concurrent process never
        # leaves a half-written file under the final name.
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, embeddings)
        os.replace(tmp, cache_file)
    return torch.from_numpy(embeddings), num_missing
