"""The item vocabulary of an M2Rec model: raw catalogue ids ↔ model item ids, as a transformers tokenizer.

    tokenizer = AutoTokenizer.from_pretrained("runs/ml-1m/best", trust_remote_code=True)   # or a Hub repo id
    batch = tokenizer([["1193", "661", "914"], ["3408"]], return_tensors="pt")            # right-padded, most recent
    items, scores = model.recommend(**batch, k=10)                                         # max_len items kept
    tokenizer.batch_decode(items)                                                          # raw ids again

Why a tokenizer rather than a processor. A vocabulary that maps a user's own symbols to model ids, pads and truncates
them and maps the model's answer back is what a tokenizer is in transformers, and everything around it expects one:
`AutoTokenizer` loads it from a folder or Hub repo (remote code through `auto_map` in tokenizer_config.json), every
pipeline loads it as its `tokenizer` without being told, `save_pretrained`/`push_to_hub` write it and copy this file,
and its output (`input_ids`, `attention_mask`) is what `model(**batch)` takes. A `ProcessorMixin` is built to bundle
such components (a tokenizer with an image or audio processor), each saved and loaded by its own class, and pipelines
load it only when they declare a processor: for one vocabulary it would be a wrapper around a tokenizer-like class,
not an alternative to it. The text machinery of the base class (added tokens, normalisation, splitting strings) does
not apply to item ids, so `__call__` and `decode` are this class's own: an item history is a list of raw ids, never a
string to split.

Files: the vocabulary is `item_id_map.json` ({raw id: model id}, the file `m2rec-train` has always written and other
tools read; written byte for byte as before), next to tokenizer_config.json (`model_max_length` = the model's
`max_len`, `auto_map`).
"""

import json
import os

from transformers import BatchEncoding, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"item_id_map_file": "item_id_map.json"}
PAD_TOKEN = "[PAD]"  # model id 0; not a raw id of any catalogue (refused if one has it)


def raw_item_id(item) -> str:
    """The text form of a raw catalogue id, as item_id_map.json keys it: ints (and integral floats, as a float column
    gives them) as decimal integers, strings as they are."""
    if isinstance(item, bool):
        raise TypeError(f"raw item ids are strings or integers, got {item!r}")
    if isinstance(item, float) and item.is_integer():
        return str(int(item))
    if isinstance(item, (str, int)):
        return str(item)
    if hasattr(item, "item"):  # a numpy or torch scalar
        return raw_item_id(item.item())
    raise TypeError(f"raw item ids are strings or integers, got {type(item).__name__} {item!r}")


class M2RecItemTokenizer(PreTrainedTokenizer):
    """Raw catalogue ids ↔ M2Rec item ids 1..num_items (0 is padding).

    Args:
        item_id_map_file: path of item_id_map.json, {raw id: model id}, each model id 1..num_items exactly once.
        item_id_map: the same mapping as a dict, instead of a file.
        model_max_length: the model's `max_len`; histories are cut to their most recent `model_max_length` items.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"  # the model reads right-padded histories: real items first
    truncation_side = "left"  # keep the most recent items

    def __init__(self, item_id_map_file: str | None = None, item_id_map: dict | None = None,
                 model_max_length: int | None = None, pad_token: str = PAD_TOKEN, **kwargs):
        if (item_id_map_file is None) == (item_id_map is None):
            raise ValueError("give the vocabulary as item_id_map_file (item_id_map.json) or as item_id_map (a dict)")
        if item_id_map_file is not None:
            with open(item_id_map_file, encoding="utf-8") as file:
                item_id_map = json.load(file)
        self.item_to_id = {raw_item_id(raw): model_id for raw, model_id in item_id_map.items()}
        self._check_vocabulary(pad_token)
        self.id_to_item = {model_id: raw for raw, model_id in self.item_to_id.items()}
        self.id_to_item[0] = pad_token
        kwargs.setdefault("padding_side", self.padding_side)
        kwargs.setdefault("truncation_side", self.truncation_side)
        super().__init__(model_max_length=model_max_length, pad_token=pad_token, **kwargs)

    def _check_vocabulary(self, pad_token: str) -> None:
        model_ids = list(self.item_to_id.values())
        num_items = len(model_ids)
        bad = [model_id for model_id in model_ids
               if isinstance(model_id, bool) or not isinstance(model_id, int) or not 1 <= model_id <= num_items]
        if bad or len(set(model_ids)) != num_items:
            raise ValueError(f"an item vocabulary maps each model id 1..{num_items} from exactly one raw id; got "
                             f"{bad[:5] or 'repeated ids'}")
        if pad_token in self.item_to_id:
            raise ValueError(f"the raw id {pad_token!r} is the padding token; give pad_token another name")

    @property
    def num_items(self) -> int:
        return len(self.item_to_id)

    @property
    def vocab_size(self) -> int:
        return self.num_items + 1  # padding included, as `M2RecConfig.vocab_size`

    def get_vocab(self) -> dict[str, int]:
        return {self.pad_token: 0, **self.item_to_id}

    def _convert_token_to_id(self, token: str) -> int:
        return 0 if token == self.pad_token else self.item_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.id_to_item[index]

    def _tokenize(self, text, **kwargs):
        raise TypeError("an item history is a list of raw ids, not a string to split: call tokenizer(history) or "
                        "tokenizer([history, ...])")

    def encode_history(self, history, on_unknown: str = "error") -> tuple[list[int], list[str]]:
        """(model ids, skipped raw ids) of one history, in order and whole (not truncated).

        on_unknown: "error" raises a ValueError naming the raw ids not in the vocabulary; "skip" drops them and
            returns them as the second element.
        """
        if on_unknown not in ("error", "skip"):
            raise ValueError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
        if isinstance(history, (str, bytes)):
            raise TypeError(f"a history is a list of raw ids, got the string {history!r}; write [{history!r}]")
        model_ids, unknown = [], []
        for item in history:
            raw = raw_item_id(item)
            if raw in self.item_to_id:
                model_ids.append(self.item_to_id[raw])
            else:
                unknown.append(raw)
        if unknown and on_unknown == "error":
            raise ValueError(f"raw item ids not in this model's catalogue of {self.num_items} items: "
                             f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} (pass on_unknown='skip' to drop "
                             f"them)")
        return model_ids, unknown

    def __call__(self, histories, padding: bool | str = True, truncation: bool = True, max_length: int | None = None,
                 return_tensors: str | None = None, on_unknown: str = "error", **kwargs) -> BatchEncoding:
        """Encodes one history (a list of raw ids) or a batch (a list of such lists).

        Args:
            histories: raw ids, oldest first; str or int (ints are matched as their decimal text).
            padding: True or "longest" pads to the longest history, "max_length" to `max_length`, right-padded with 0.
                False leaves the histories as they are (lists only).
            truncation: keep each history's most recent `max_length` items (True, the default: the model takes at
                most `max_len`); False keeps them all.
            max_length: defaults to `model_max_length`, the model's `max_len`.
            return_tensors: "pt" (or "np") for (B, L) tensors; None for lists.
            on_unknown: "error" (default) raises a ValueError naming raw ids the model does not know; "skip" drops
                them. The skipped raw ids of each history are the output's `skipped_items` attribute (a list of lists,
                so their counts are its lengths).
        Returns:
            [`BatchEncoding`] with `input_ids` and `attention_mask`, (B, L) or, for one history, (1, L) with
            tensors and flat lists without.
        Raises:
            ValueError: a raw id is unknown (with on_unknown="error"), or a history has no known item (the model
            needs at least one).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for an item history")
        single = not is_batch(histories)
        batch = [histories] if single else list(histories)
        if padding is True:
            padding = "longest"
        if padding not in (False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        max_length = max_length if max_length is not None else self.model_max_length
        encoded, skipped = [], []
        for index, history in enumerate(batch):
            model_ids, unknown = self.encode_history(history, on_unknown)
            if not model_ids:
                raise ValueError(f"history {index} has no item of this model's catalogue "
                                 f"({len(unknown)} unknown raw ids skipped); the model needs at least one item")
            encoded.append(model_ids[-max_length:] if truncation else model_ids)
            skipped.append(unknown)
        if padding in ("longest", "max_length"):
            width = max_length if padding == "max_length" else max(len(ids) for ids in encoded)
            masks = [[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]
            encoded = [ids + [0] * (width - len(ids)) for ids in encoded]
        else:
            if return_tensors is not None and len({len(ids) for ids in encoded}) > 1:
                raise ValueError("histories of different lengths need padding=True to become one tensor")
            masks = [[1] * len(ids) for ids in encoded]
        data = {"input_ids": encoded, "attention_mask": masks}
        if single and return_tensors is None:
            data = {name: rows[0] for name, rows in data.items()}
        output = BatchEncoding(data, tensor_type=return_tensors)
        output.skipped_items = skipped[0] if single else skipped
        return output

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Raw ids of model item ids, a list or 1-D tensor (padding dropped; kept as "[PAD]" with
        skip_special_tokens=False). Refuses ids outside 0..num_items, naming them."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        unknown = [index for index in ids if index not in self.id_to_item]
        if unknown:
            raise ValueError(f"model item ids {unknown[:10]} are outside 0..{self.num_items}")
        return [self.id_to_item[index] for index in ids if index != 0 or not skip_special_tokens]

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[list[str]]:
        """[`decode`] of each row of a (B, k) tensor or list of lists."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    def check_new_items(self, items) -> list[str]:
        """The raw ids of `items` (a list of str or int) as text, checked to be new: a ValueError names the ids given
        twice, already in the vocabulary, or equal to the padding token."""
        if isinstance(items, (str, bytes)):
            raise TypeError(f"items is a list of raw ids, got the string {items!r}; write [{items!r}]")
        raw_ids = [raw_item_id(item) for item in items]
        if not raw_ids:
            raise ValueError("no items given: pass a list of raw ids")
        seen, repeated = set(), []
        for raw in raw_ids:
            if raw in seen:
                repeated.append(raw)
            seen.add(raw)
        if repeated:
            raise ValueError(f"raw ids given more than once: {repeated[:10]}")
        known = [raw for raw in raw_ids if raw in self.item_to_id or raw == self.pad_token]
        if known:
            raise ValueError(f"raw ids already in this vocabulary of {self.num_items} items (or the padding token "
                             f"{self.pad_token!r}): {known[:10]}{' ...' if len(known) > 10 else ''}")
        return raw_ids

    def add_items(self, items) -> list[int]:
        """Adds new raw ids (a list of str or int) to the vocabulary as model ids num_items + 1, num_items + 2, ... in
        order, and returns those ids. Refuses (changing nothing) ids given twice or already known. The model must grow
        with it: [`M2RecForSequentialRecommendation.add_items`] does both."""
        raw_ids = self.check_new_items(items)
        new_ids = list(range(self.num_items + 1, self.num_items + 1 + len(raw_ids)))
        self.item_to_id.update(zip(raw_ids, new_ids))
        self.id_to_item.update(zip(new_ids, raw_ids))
        return new_ids

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Writes item_id_map.json as m2rec-train always has: compact JSON of {raw id: model id}."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["item_id_map_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.item_to_id))
        return (path,)


def is_batch(histories) -> bool:
    """A batch is a list of histories; a single history is a list of raw ids (str or int)."""
    if isinstance(histories, (str, bytes)):
        raise TypeError(f"a history is a list of raw ids, got the string {histories!r}; write [{histories!r}]")
    items = list(histories)
    if not items:
        raise ValueError("no history given: pass a list of raw ids, or a list of such lists")
    return isinstance(items[0], (list, tuple)) or getattr(items[0], "ndim", 0) > 0


M2RecItemTokenizer.register_for_auto_class("AutoTokenizer")
