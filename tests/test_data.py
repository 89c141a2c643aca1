"""Readers, preprocessing, cache and leave-one-out views on small fixture files written here."""

import gzip
import json

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

import m2rec.training.data as data
from m2rec.training.data import (
    DataArguments,
    EpochSubsetSampler,
    EvalDataset,
    PreparedDataset,
    TrainDataset,
    collate_eval,
    collate_train,
    prepare_dataset,
    read_raw,
)


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding=encoding) as f:
            f.write(text)
    else:
        path.write_text(text, encoding=encoding)
    return path


def ids(raw, column):
    """A reader's user or item column as raw ids, row by row."""
    codes, names = (raw.users, raw.user_names) if column == "users" else (raw.items, raw.item_names)
    return [names[code] for code in codes.tolist()]


def args(tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataArguments(**kwargs)


# --- readers ------------------------------------------------------------------------------------


def test_movielens_1m_files(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    write(tmp_path / "movies.dat", "10::Café Society (1995)::Comedy|Romance\n20::Heat (1995)::Action\n", "latin-1")
    raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path)))
    assert ids(raw, "users") == ["1", "1", "2"] and ids(raw, "items") == ["10", "20", "10"]
    assert raw.ratings.tolist() == [5.0, 3.0, 4.0] and raw.timestamps.tolist() == [978300760.0, 978302109.0, 978301968.0]
    assert raw.item_text == {"10": "Café Society (1995), Comedy, Romance", "20": "Heat (1995), Action"}


def test_movielens_100k_files(tmp_path):
    write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = ["0"] * 19
    flags[1] = flags[16] = "1"  # Action, Thriller
    write(tmp_path / "u.item", "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags) + "\n", "latin-1")
    raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path / "u.data")))
    assert ids(raw, "items") == ["242", "302"] and raw.ratings.tolist() == [3.0, 3.0]
    assert raw.item_text == {"242": "Kolya (1996), Action, Thriller"}
    raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path),
                        text_template="{title} ({release_date})"))
    assert raw.item_text == {"242": "Kolya (1996) (24-Jan-1997)"}


def test_recbole_atomic_files(tmp_path):
    write(tmp_path / "ml" / "ml.inter",
          "timestamp:float\tuser_id:token\titem_id:token\trating:float\n5\tu1\ti1\t4\n6\tu1\ti2\t2\n")
    write(tmp_path / "ml" / "ml.item",
          "item_id:token\tmovie_title:token_seq\tgenre:token_seq\ni1\tHeat\tAction Crime\n")
    raw = read_raw(args(tmp_path, format="recbole", data_path=str(tmp_path / "ml"), rating_threshold=3))
    assert ids(raw, "users") == ["u1", "u1"] and ids(raw, "items") == ["i1", "i2"]
    assert raw.timestamps.tolist() == [5.0, 6.0] and raw.ratings.tolist() == [4.0, 2.0]
    assert raw.item_text == {"i1": "Heat, Action Crime"}


def test_sequence_file_with_item_table(tmp_path):
    write(tmp_path / "seq.txt.gz", "A x y z\nB z x\n")
    write(tmp_path / "titles.tsv", 'asin\ttitle\nx\t12" "Brush" set\nz\tLip balm\n')
    raw = read_raw(args(tmp_path, format="sequence", data_path=str(tmp_path / "seq.txt.gz"),
                        item_path=str(tmp_path / "titles.tsv"), item_id_column="asin"))
    assert ids(raw, "users") == ["A", "A", "A", "B", "B"] and ids(raw, "items") == ["x", "y", "z", "z", "x"]
    assert raw.timestamps is None
    assert raw.item_text == {"x": '12" "Brush" set', "z": "Lip balm"}


def test_table_with_text_from_interactions_and_lookup(tmp_path):
    # Foursquare-like: item text is a category code in the interaction table, named in a mapping file.
    write(tmp_path / "checkins.csv.gz", "Uid,Pid,Catname,Time\n1,p1,25,2012-04-03 14:00\n1,p2,3,2012-04-03 15:30\n"
                                        "2,p1,3,2012-04-04 09:00\n")
    write(tmp_path / "cat.csv", "Original_Catname,Mapped_Catname\n\"Bar, Pub\",25\nFood,3\n")
    raw = read_raw(args(tmp_path, format="table", data_path=str(tmp_path / "checkins.csv.gz"), user_column="Uid",
                        item_column="Pid", time_column="Time", text_columns=["Catname"],
                        text_lookup_path=str(tmp_path / "cat.csv"), text_lookup_column="Catname",
                        text_lookup_key="Mapped_Catname", text_lookup_value="Original_Catname"))
    assert ids(raw, "items") == ["p1", "p2", "p1"]
    assert raw.timestamps[1] - raw.timestamps[0] == 90 * 60
    assert raw.item_text == {"p1": "Bar, Pub", "p2": "Food"}  # first value per item wins


def test_table_jsonl_and_parquet_agree(tmp_path):
    rows = [{"u": "a", "i": 1, "t": 3}, {"u": "a", "i": 2, "t": 1}]
    write(tmp_path / "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for name in ("x.jsonl", "x.parquet"):
        raw = read_raw(args(tmp_path, format="table", data_path=str(tmp_path / name), user_column="u",
                            item_column="i", time_column="t"))
        assert (ids(raw, "users"), ids(raw, "items"), raw.timestamps.tolist()) == (["a", "a"], ["1", "2"], [3.0, 1.0])


TABLE_ROWS = [("007", "3.0", "2012-04-03 14:00", "4", "Bar, Pub"), ("8", " 3", "2012-04-03T15:30+02:00", "5", "x"),
              ("007", "Käse", "2012-04-04", "1", "Food"), ("9", "4.00", "2012-04-05 10:00:30", "2.5", "Food")]


@pytest.mark.parametrize("name, numeric_time", [("t.csv", False), ("t.csv.gz", True), ("t.tsv", False),
                                                ("ml.inter", True), ("t.parquet", True), ("t.parquet", False),
                                                ("t.jsonl", True), ("t.jsonl.gz", False)])
def test_columnar_table_reader_reads_as_the_row_reader_does(tmp_path, name, numeric_time):
    """The columnar reader takes valid files itself (never the row-by-row reader) and gives what the row-by-row
    reader gives: codes, raw ids ("007" kept, "3.0" and " 3" one item), times (ISO dates too), text from rows."""
    columns = ["user_id", "item_id", "timestamp", "rating", "category"]
    rows = [dict(zip(columns, row)) for row in TABLE_ROWS]
    if numeric_time:
        for number, row in enumerate(rows):
            row["timestamp"] = 1e9 + 0.5 * number
    path = tmp_path / name
    if ".parquet" in name:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ".jsonl" in name:
        write(path, "".join(json.dumps(row) + "\n" for row in rows))
    else:
        separator = "," if ".csv" in name else "\t"
        header = [f"{c}:token" for c in columns] if name.endswith(".inter") else columns
        quote = (lambda v: f'"{v}"' if "," in str(v) else str(v)) if separator == "," else str
        write(path, "\n".join(separator.join(quote(v) for v in line)
                              for line in [header] + [list(r.values()) for r in rows]) + "\n")
    options = args(tmp_path, format="recbole" if name.endswith(".inter") else "table", data_path=str(path),
                   rating_threshold=2, text_columns=["category"], text_template="{category} ({rating})")
    files = data._input_files(options)
    columnar, by_rows = data._read_table_columns(files, options), data._read_table_rows(files, options)
    assert ids(columnar, "users") == ["007", "8", "007", "9"] and ids(columnar, "items") == ["3", "3", "Käse", "4"]
    for field in ("users", "user_names", "items", "item_names", "timestamps", "ratings", "item_text"):
        assert (getattr(columnar, field) == getattr(by_rows, field)).all() if field in (
            "users", "items", "timestamps", "ratings") else getattr(columnar, field) == getattr(by_rows, field), field
    assert columnar.users.dtype == by_rows.users.dtype == np.int32
    assert columnar.item_text["3"] == "Bar, Pub (4)"


LINE_FILES = {
    # blank and whitespace-only lines, runs of spaces and tabs, "3.0" and "3" one id, "007" kept, non-ASCII ids
    "seq.txt": "u1 3 b  c\n\n  \t \n  007\t3.0 Käse \r\nu3 007 b\n3.0 x\n",
    "seq.txt.gz": "\ufeffu1 a b\nu2 b a\n",
    "ratings.dat": "1::10::5::978300760\n2::11:: 4 ::978300761\n\n 1 ::11::3.5::978300762\n007::10.0::1::5\n",
    "ratings-latin.dat": "1::Café::5::1\n2::Café::4::2\n",
    "u.data": "196\t242\t3\t881250949\n186 \t302\t3\t891717742\n\n196\t302\t1\t881250950\n",
}


@pytest.mark.parametrize("name", list(LINE_FILES))
def test_columnar_line_readers_read_as_the_row_readers_do(tmp_path, name):
    """The sequence and MovieLens readers take valid files in columns (never row by row) and give what reading
    them row by row gives: codes in order of first appearance, raw ids, ratings, timestamps."""
    path = write(tmp_path / name, LINE_FILES[name], "latin-1" if "latin" in name else "utf-8")
    options = args(tmp_path, format="sequence" if "seq" in name else "movielens", data_path=str(path))
    if "seq" in name:
        columnar, by_rows = data._sequence_columns(path, options), data._sequence_rows(path, options)
    else:
        double_colon = name.endswith(".dat")
        columnar = data._movielens_columns(path, options, double_colon)
        by_rows = data._movielens_rows(path, options, double_colon)
    assert len(columnar) == len(by_rows) > 0
    for field in ("users", "user_names", "items", "item_names", "timestamps", "ratings"):
        value, expected = getattr(columnar, field), getattr(by_rows, field)
        if isinstance(expected, np.ndarray):
            assert value.dtype == expected.dtype and (value == expected).all(), field
        else:
            assert value == expected, field
    if name == "seq.txt":
        assert ids(columnar, "users") == ["u1"] * 3 + ["007"] * 2 + ["u3"] * 2 + ["3"]
        assert ids(columnar, "items") == ["3", "b", "c", "3", "Käse", "007", "b", "x"]


def test_line_readers_fall_back_to_rows_for_lines_arrow_cannot_take(tmp_path, caplog):
    """A line holding the ASCII unit separator (Arrow's field separator here, whitespace to str.split) is read
    row by row, with the same result as reading the file without it."""
    path = write(tmp_path / "seq.txt", "u1 a\x1fb\nu2 b\n")
    with caplog.at_level("INFO", logger="m2rec.training.data"):
        raw = read_raw(args(tmp_path, format="sequence", data_path=str(path)))
    assert "reading it row by row" in caplog.text
    assert ids(raw, "users") == ["u1", "u1", "u2"] and ids(raw, "items") == ["a", "b", "b"]


def test_ids_are_coded_in_order_of_first_appearance_across_chunks():
    import pyarrow as pa

    numbers = pa.chunked_array([[5.0, 3.0], [3.0, 7.0, 5.0], [3.5]])
    codes, names = data._encode_ids(numbers, "item_id")
    assert codes.tolist() == [0, 1, 1, 2, 0, 3] and names == ["5", "3", "7", "3.5"]
    # Chunks with their own dictionaries (as Arrow's CSV reader gives them); "8" and " 8" are one id.
    text = pa.chunked_array([pa.array(["b", "a"]).dictionary_encode(), pa.array(["c", "8", "a"]).dictionary_encode(),
                             pa.array([" 8", "d"]).dictionary_encode()])
    codes, names = data._encode_ids(text, "user_id")
    assert codes.tolist() == [0, 1, 2, 3, 1, 3, 4] and names == ["b", "a", "c", "8", "d"]
    assert codes.dtype == np.int32


@pytest.mark.parametrize("name, text, options, expected", [
    ("ratings.dat", "1::2::3::4\n1::2::3\n", {"format": "movielens"}, "line 2"),
    ("ratings.dat", "1::2::3::4\n\n1::2::x::4\n", {"format": "movielens"}, "line 3: rating must be a number"),
    ("seq.txt", "u1 a b\nu2\n", {"format": "sequence"}, "line 2: expected 'user item"),
    ("seq.txt", "u1 a b\nu1 c\n", {"format": "sequence"}, "line 2: user 'u1' already has a line (1)"),
    ("t.csv", "user_id,item_id,timestamp\n1,2,3\n1,2\n", {"format": "table"}, "line 3: expected 3 fields"),
    ("t.csv", "user_id,item_id,timestamp\n1,2,yesterday\n", {"format": "table"}, "line 2: cannot read time"),
    ("t.csv", "user_id,item_id,timestamp\n1,,3\n", {"format": "table"}, "line 2: empty 'item_id'"),
    ("t.csv", "user,item_id,timestamp\n1,2,3\n", {"format": "table"}, "line 2: no column 'user_id'"),
    ("t.jsonl", '{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1,\n', {"format": "table"},
     "line 2: not valid JSON"),
    ("x.inter", "user_id:token\titem_id:token\n1\t2\t3\n", {"format": "recbole", "time_column": None},
     "line 2: expected 2 fields"),
    ("t.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,inf\n", {"format": "table"},
     "line 3: time must be a finite number, got 'inf'"),
    ("t.jsonl", '{"user_id": 1, "item_id": 2, "timestamp": -Infinity}\n', {"format": "table"},
     "line 1: time must be a finite number, got '-inf'"),
    ("ratings.dat", "1::2::3::4\n1::3::3::inf\n", {"format": "movielens"}, "line 2: timestamp must be a finite"),
])
def test_malformed_input_names_file_and_line(tmp_path, name, text, options, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError) as error:
        read_raw(args(tmp_path, data_path=str(path), **options))
    assert str(path) in str(error.value) and expected in str(error.value)


def test_non_utf8_with_an_explicit_encoding_names_the_file(tmp_path):
    path = write(tmp_path / "t.csv", "user_id,item_id,timestamp\n1,2,3\n1,Café,4\n", "latin-1")
    with pytest.raises(ValueError, match=r"t\.csv is not valid utf-8 at line 3 \(byte 0xe9 at offset 37\)"):
        read_raw(args(tmp_path, format="table", data_path=str(path), encoding="utf-8"))
    with pytest.raises(ValueError, match="encoding='klingon' is not a known text encoding"):
        args(tmp_path, format="table", data_path=str(path), encoding="klingon")


def test_utf8_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    table = write(tmp_path / "t.csv", "\ufeffuser_id,item_id,timestamp\n1,2,3\n")
    raw = read_raw(args(tmp_path, format="table", data_path=str(table)))
    assert ids(raw, "users") == ["1"]
    sequences = write(tmp_path / "seq.txt", "\ufeff1 a b\n")
    assert ids(read_raw(args(tmp_path, format="sequence", data_path=str(sequences))), "users") == ["1", "1"]


def test_encoding_reads_utf8_and_falls_back_to_latin1(tmp_path, caplog):
    write(tmp_path / "utf8" / "ratings.dat", "1::10::5::1\n")
    write(tmp_path / "utf8" / "movies.dat", "10::Amélie (2001)::Comedy\n")
    raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path / "utf8")))
    assert raw.item_text == {"10": "Amélie (2001), Comedy"}
    write(tmp_path / "latin" / "ratings.dat", "1::10::5::1\n")
    write(tmp_path / "latin" / "movies.dat", "10::Amélie (2001)::Comedy\n", "latin-1")
    with caplog.at_level("INFO", logger="m2rec.training.data"):
        raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path / "latin")))
    assert raw.item_text == {"10": "Amélie (2001), Comedy"}
    assert "movies.dat is not valid UTF-8" in caplog.text and "reading it as latin-1" in caplog.text
    # An explicit encoding is used as given.
    raw = read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path / "utf8"), encoding="latin-1"))
    assert raw.item_text == {"10": "AmÃ©lie (2001), Comedy"}


def test_integral_float_ids_are_the_integer_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A float item column (as pandas writes one with missing values) against an int item table.
    rows = [{"user_id": 1.0, "item_id": 3.0, "timestamp": 1}, {"user_id": 1.0, "item_id": 4.0, "timestamp": 2},
            {"user_id": 2.0, "item_id": 3.5, "timestamp": 3}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    write(tmp_path / "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "x.csv", "user_id,item_id,timestamp\n1.0,3.0,1\n1,4.00,2\n2,3.5,3\n")
    write(tmp_path / "items.csv", "item_id,title\n3,Three\n4,Four\n")
    for name in ("x.parquet", "x.jsonl", "x.csv"):
        raw = read_raw(args(tmp_path, format="table", data_path=str(tmp_path / name),
                            item_path=str(tmp_path / "items.csv")))
        assert ids(raw, "users") == ["1", "1", "2"] and ids(raw, "items") == ["3", "4", "3.5"], name
        assert raw.item_text == {"3": "Three", "4": "Four"}
    write(tmp_path / "items.jsonl", '{"item_id": 3.0, "title": "Three"}\n')
    write(tmp_path / "seq.txt", "u 3 4.0 3\n")
    raw = read_raw(args(tmp_path, format="sequence", data_path=str(tmp_path / "seq.txt"),
                        item_path=str(tmp_path / "items.jsonl")))
    assert ids(raw, "items") == ["3", "4", "3"] and raw.item_text == {"3": "Three"}


def test_conflicting_texts_for_one_item_are_reported(tmp_path, caplog):
    write(tmp_path / "seq.txt", "u a b\n")
    write(tmp_path / "items.csv", "item_id,title\na,Alpha\nb,Beta\na,Alpha\na,Aleph\n")
    with caplog.at_level("WARNING", logger="m2rec.training.data"):
        raw = read_raw(args(tmp_path, format="sequence", data_path=str(tmp_path / "seq.txt"),
                            item_path=str(tmp_path / "items.csv")))
    assert raw.item_text == {"a": "Alpha", "b": "Beta"}  # the first text wins; a repeat of it is no conflict
    assert "items.csv: 1 rows give another text" in caplog.text
    assert "'a': line 2 'Alpha', line 5 'Aleph'" in caplog.text


def test_item_table_ids_that_match_no_interaction(tmp_path, caplog):
    write(tmp_path / "seq.txt", "u a b c\n")
    write(tmp_path / "items.csv", "asin,title\nB001,Alpha\nB002,Beta\n")
    with pytest.raises(ValueError) as error:
        read_raw(args(tmp_path, format="sequence", data_path=str(tmp_path / "seq.txt"),
                      item_path=str(tmp_path / "items.csv"), item_id_column="asin"))
    message = str(error.value)
    assert "none of the 3 items of" in message and "items.csv" in message
    assert "['a', 'b', 'c']" in message and "['B001', 'B002']" in message
    write(tmp_path / "items.csv", "asin,title\na,Alpha\nB002,Beta\n")
    with caplog.at_level("WARNING", logger="m2rec.training.data"):
        raw = read_raw(args(tmp_path, format="sequence", data_path=str(tmp_path / "seq.txt"),
                            item_path=str(tmp_path / "items.csv"), item_id_column="asin"))
    assert raw.item_text == {"a": "Alpha", "B002": "Beta"}
    assert "2 of 3 items" in caplog.text and "['b', 'c']" in caplog.text


def test_malformed_item_file_names_file_and_line(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::1\n")
    write(tmp_path / "movies.dat", "10::Heat::Action\n11::Broken\n", "latin-1")
    with pytest.raises(ValueError, match=r"movies\.dat, line 2: expected 3 fields"):
        read_raw(args(tmp_path, format="movielens", data_path=str(tmp_path)))


# --- preprocessing ------------------------------------------------------------------------------


def sequence_file(tmp_path, lines, name="seq.txt"):
    return str(write(tmp_path / name, "".join(line + "\n" for line in lines)))


def test_iterative_k_core(tmp_path):
    # One pass would keep u3 and d; removing u4 drops e below 2, then u3 below 3, then d below 2.
    path = sequence_file(tmp_path, ["u1 a b c", "u2 a b c d", "u3 a d e", "u4 e f"])
    prepared = prepare_dataset(args(tmp_path, format="sequence", data_path=path, user_core=3, item_core=2))
    assert prepared.user_ids == ["u1", "u2"]
    assert prepared.item_id_map == {"a": 1, "b": 2, "c": 3}
    assert prepared.sequences == [[1, 2, 3], [1, 2, 3]]


def test_user_core_is_at_least_three(tmp_path):
    path = sequence_file(tmp_path, ["u1 a b c", "u2 a b"])
    prepared = prepare_dataset(args(tmp_path, format="sequence", data_path=path, user_core=0, item_core=0))
    assert prepared.user_ids == ["u1"]


def test_empty_after_filtering_is_an_error(tmp_path):
    path = sequence_file(tmp_path, ["u1 a b c", "u2 d e f"])
    with pytest.raises(ValueError, match="no interactions left after filtering.*item_core=2"):
        prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))


def test_rating_threshold(tmp_path):
    write(tmp_path / "ratings.dat", "".join(f"1::{i}::{1 + i % 5}::{i}\n" for i in range(10)))
    prepared = prepare_dataset(args(tmp_path, format="movielens", data_path=str(tmp_path), rating_threshold=4,
                                    user_core=3, item_core=0))
    assert list(prepared.item_id_map) == ["3", "4", "8", "9"]  # ratings 4 and 5
    with pytest.raises(ValueError, match="gave no ratings"):
        prepare_dataset(args(tmp_path, format="sequence", data_path=sequence_file(tmp_path, ["u a b c"]),
                             rating_threshold=4))


def test_stable_time_sort_and_id_remap(tmp_path):
    # User x: times 5, 3, 3, 1 -> s, q, r, p (q before r: ties keep file order). User y: r and q tie.
    rows = ["x,p,5", "y,r,2", "x,q,3", "x,r,3", "y,q,2", "x,s,1", "y,p,1"]
    path = write(tmp_path / "t.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    prepared = prepare_dataset(args(tmp_path, format="table", data_path=str(path), user_core=3, item_core=0))
    assert prepared.item_id_map == {"p": 1, "r": 2, "q": 3, "s": 4}  # first appearance in the file
    assert prepared.user_ids == ["x", "y"]
    assert prepared.sequences == [[4, 3, 2, 1], [1, 2, 3]]
    assert prepared.num_items == 4 and prepared.num_interactions == 7
    assert prepared.timestamps == [[1.0, 3.0, 3.0, 5.0], [1.0, 2.0, 2.0]]  # each time stays with its item
    saved = json.loads((prepared.path / "item_id_map.json").read_text())
    assert saved == {"p": 1, "r": 2, "q": 3, "s": 4}
    assert data.PreparedDataset.load(prepared.path).timestamps == prepared.timestamps


def test_item_texts_aligned_to_new_ids(tmp_path):
    path = sequence_file(tmp_path, ["u1 b a c"])
    write(tmp_path / "items.tsv", "item_id\ttitle\nc\tCee\nb\tBee\n")
    prepared = prepare_dataset(args(tmp_path, format="sequence", data_path=path, user_core=3, item_core=0,
                                    item_path=str(tmp_path / "items.tsv")))
    assert prepared.item_texts == ["", "Bee", None, "Cee"]  # ids: b=1, a=2 (no text), c=3


# --- cache --------------------------------------------------------------------------------------


def test_cache_hit_and_miss(tmp_path, monkeypatch):
    path = sequence_file(tmp_path, ["u1 a b c d e", "u2 a b c d e"])
    first = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))
    assert (first.path / "meta.json").exists()
    assert first.timestamps is None and PreparedDataset.load(first.path).times is None  # sequence files have no times
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left

    def no_reading(_):
        raise AssertionError("read_raw called")

    monkeypatch.setattr(data, "read_raw", no_reading)
    again = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2, max_len=3))
    assert again.path == first.path and again.sequences == first.sequences
    assert again.item_id_map == first.item_id_map and again.user_ids == first.user_ids
    with pytest.raises(AssertionError, match="read_raw called"):  # a changed setting misses
        prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=1))
    sequence_file(tmp_path, ["u1 a b c d e", "u2 a b c d f"])
    with pytest.raises(AssertionError, match="read_raw called"):  # changed file bytes miss
        prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))


@pytest.mark.parametrize("damage", ["truncate sequences.arrow", "empty item_texts.json", "delete meta.json",
                                    "edit meta.json"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    path = sequence_file(tmp_path, ["u1 a b c d e", "u2 a b c d e"])
    first = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))
    action, name = damage.split()
    target = first.path / name
    if action == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif action == "empty":
        target.write_bytes(b"")
    elif action == "delete":
        target.unlink()
    else:
        target.write_text(json.dumps({**json.loads(target.read_text()), "num_users": 7}))
    with caplog.at_level("WARNING", logger="m2rec.training.data"):
        again = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))
    assert f"the cached prepared data in {first.path} is damaged" in caplog.text
    assert (name in caplog.text) if action != "edit" else "num_users" in caplog.text
    assert again.sequences == first.sequences and again.item_id_map == first.item_id_map
    assert PreparedDataset.load(first.path).sequences == first.sequences  # the rebuilt entry is whole again


def test_prepared_dataset_carries_its_fingerprint(tmp_path):
    path = sequence_file(tmp_path, ["u1 a b c d e", "u2 a b c d e"])
    built = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))
    cached = prepare_dataset(args(tmp_path, format="sequence", data_path=path, item_core=2))
    assert built.fingerprint == cached.fingerprint == data.fingerprint(
        args(tmp_path, format="sequence", data_path=path, item_core=2))


# --- leave-one-out views ------------------------------------------------------------------------


def hand_dataset():
    return PreparedDataset.from_sequences(sequences=[[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 1, 2]], user_ids=["a", "b"],
                                          item_id_map={str(i): i for i in range(1, 8)}, item_texts=[""] + [None] * 7)


def test_leave_one_out_split():
    prepared = hand_dataset()
    assert prepared.train_sequences() == [[1, 2, 3], [3, 4, 5, 6, 7]]
    assert prepared.eval_examples("valid") == [([1, 2, 3], 4), ([3, 4, 5, 6, 7], 1)]
    assert prepared.eval_examples("test") == [([1, 2, 3, 4], 5), ([3, 4, 5, 6, 7, 1], 2)]
    assert prepared.eval_examples("test", max_len=2) == [([3, 4], 5), ([7, 1], 2)]


def test_train_dataset_all_positions_and_truncation():
    prepared = hand_dataset()
    full = TrainDataset(prepared, max_len=10)
    assert [full[k] for k in range(len(full))] == [
        {"input_ids": [1, 2], "labels": [2, 3]},
        {"input_ids": [3, 4, 5, 6], "labels": [4, 5, 6, 7]},
    ]
    short = TrainDataset(prepared, max_len=2)  # windows of max_len + 1 items, from the most recent back
    assert [short[k] for k in range(len(short))] == [
        {"input_ids": [1, 2], "labels": [2, 3]},
        {"input_ids": [5, 6], "labels": [6, 7]},
        {"input_ids": [3, 4], "labels": [4, 5]},
    ]
    batch = collate_train([short[0], full[1]])
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[2, 3, -100, -100], [4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert collate_train([short[0]], pad_to=3)["input_ids"].shape == (1, 3)


@pytest.mark.parametrize("max_len, stride", [(1, None), (2, None), (3, None), (10, None), (3, 1), (3, 2), (4, 3)])
def test_train_dataset_labels_every_item_once(max_len, stride):
    """Every training item after a user's first is the label of exactly one position, with the items before it
    in the same window as its context: at least max_len - stride + 1 inputs up to its position (the item before
    it included) when the user has them."""
    prepared = hand_dataset()
    dataset = TrainDataset(prepared, max_len=max_len, stride=stride)
    stride = stride or max_len
    labelled = {user: [] for user in range(len(prepared.train_sequences()))}
    for k in range(len(dataset)):
        sample, sequence = dataset[k], prepared.train_sequences()[int(dataset.users[k])]
        assert 1 <= len(sample["input_ids"]) <= max_len
        assert sample["input_ids"] == sequence[int(dataset.ends[k]) - len(sample["input_ids"]):int(dataset.ends[k])]
        for position, label in enumerate(sample["labels"]):
            if label != -100:
                assert label == sequence[int(dataset.ends[k]) - len(sample["labels"]) + position + 1]
                item_index = int(dataset.ends[k]) - len(sample["labels"]) + position + 1
                assert position + 1 >= min(max_len - stride + 1, item_index), (max_len, stride, k, position)
                labelled[int(dataset.users[k])].append(label)
    for user, sequence in enumerate(prepared.train_sequences()):
        assert sorted(labelled[user]) == sorted(sequence[1:]), (max_len, stride, user)


def test_train_dataset_overlapping_windows():
    windows = TrainDataset(hand_dataset(), max_len=3, stride=1)
    assert [windows[k] for k in range(len(windows))][-4:] == [
        {"input_ids": [4, 5, 6], "labels": [-100, -100, 7]},
        {"input_ids": [3, 4, 5], "labels": [-100, -100, 6]},
        {"input_ids": [3, 4], "labels": [-100, 5]},
        {"input_ids": [3], "labels": [4]},
    ]
    assert windows.num_targets == TrainDataset(hand_dataset(), max_len=3).num_targets == 2 + 4
    with pytest.raises(ValueError, match="train_window_stride=4 must be between 1 and max_len=3"):
        TrainDataset(hand_dataset(), max_len=3, stride=4)


def test_train_dataset_every_prefix():
    prefixes = TrainDataset(hand_dataset(), max_len=2, mode="last")
    samples = [prefixes[k] for k in range(len(prefixes))]
    assert samples[:2] == [{"input_ids": [1], "labels": [2]}, {"input_ids": [1, 2], "labels": [-100, 3]}]
    assert samples[-1] == {"input_ids": [5, 6], "labels": [-100, 7]}
    assert len(samples) == 2 + 4
    batch = collate_train(samples[:2])
    assert batch["labels"].tolist() == [[2, -100], [-100, 3]]


def test_epoch_subset_sampler_draws_a_new_subset_each_epoch():
    sampler = EpochSubsetSampler(size=50, num_samples=20, seed=3)
    draws = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    assert all(len(draw) == len(set(draw)) == len(sampler) == 20 for draw in draws)
    assert all(0 <= index < 50 for index in draws[0])
    assert draws[0] != draws[1] and draws[0] == draws[2]  # a resumed epoch draws what it drew before
    assert sorted(EpochSubsetSampler(size=5, num_samples=20, seed=3)) == list(range(5))
    with pytest.raises(ValueError, match="train_samples_per_epoch"):
        EpochSubsetSampler(size=5, num_samples=0, seed=3)


def test_eval_dataset_and_collate():
    dataset = EvalDataset(hand_dataset().leave_one_out("test"), max_len=3, include_history=True)
    batch = collate_eval([dataset[0], dataset[1]])
    assert batch["input_ids"].tolist() == [[2, 3, 4], [6, 7, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["target"].tolist() == [5, 2] and batch["user_index"].tolist() == [0, 1]
    assert batch["history"].tolist() == [[1, 2, 3, 4, 0, 0], [3, 4, 5, 6, 7, 1]]
    batch = collate_eval([EvalDataset(hand_dataset().leave_one_out("valid"), max_len=10)[0]], pad_to=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0]] and "history" not in batch
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("num_users, processes", [(7, 2), (7, 3), (2, 3), (300, 2)])
def test_eval_shards_cover_every_user_once_and_padding_never_counts(num_users, processes):
    from m2rec.training.metrics import MetricAccumulator

    prepared = PreparedDataset.from_sequences([[1 + u % 5, 2, 3 + u % 3, 4] for u in range(num_users)],
                                              [f"u{u}" for u in range(num_users)], {str(i): i for i in range(1, 6)},
                                              [""] + [None] * 5)
    examples = prepared.leave_one_out("test")
    shards = [examples.shard(index, processes) for index in range(processes)]
    assert sorted(u for shard in shards for u in shard.user_index.tolist()) == list(range(num_users))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    longest = max(map(len, shards))
    accumulator, expected = MetricAccumulator(), MetricAccumulator()
    for shard in shards:
        # A share is a contiguous range of users, and reads only their items.
        assert (np.diff(shard.user_index) == 1).all()
        dataset = EvalDataset(shard, max_len=2, length=longest)
        rows = [dataset[k] for k in range(len(dataset))]
        assert [row["user_index"] for row in rows[len(shard):]] == [-1] * (longest - len(shard))
        for row in rows[:len(shard)]:
            user = row["user_index"]
            assert row["input_ids"] == prepared.sequences[user][1:3] and row["target"] == prepared.sequences[user][3]
        batch = collate_eval(rows)
        # A per-user number stands in for the rank; padding rows would count as hits at rank 0.
        accumulator.add((batch["user_index"].clamp(min=0) * 7 % 23).float(), batch["user_index"])
    expected.add((torch.arange(num_users) * 7 % 23).float())
    assert accumulator.compute() == pytest.approx(expected.compute())


def test_data_arguments_parse_and_validate():
    (parsed,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--format", "table", "--data_path", "x.csv", "--text_columns", "name", "genre", "--time_column", "",
         "--rating_threshold", "4"])
    assert parsed.text_columns == ["name", "genre"] and parsed.time_column is None and parsed.rating_threshold == 4
    with pytest.raises(ValueError, match="needs data_path"):
        DataArguments(format="table")
    with pytest.raises(ValueError, match="format='csv'"):
        DataArguments(format="csv", data_path="x")
    with pytest.raises(ValueError, match="go together"):
        DataArguments(format="table", data_path="x", text_lookup_path="y")
