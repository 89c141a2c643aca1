"""Data preparation at scale (issue #17 §6): time and peak resident memory of `prepare_dataset` on synthetic
interaction logs of 10^6, 10^7 and 10^8 interactions, and of loading the prepared cache again.

    python bench/bench_prepare.py --sizes 1e6 1e7 --out docs/bench_prepare.json
    nice -n 19 python bench/bench_prepare.py --sizes 1e8 --formats parquet --repeats 1 --out docs/bench_prepare_1e8.json
    python bench/bench_prepare.py --sizes 1e6 1e7 --formats sequence dat --baseline --out docs/bench_prepare_lines.json
    python bench/bench_prepare.py --smoke      # 10^5 interactions, one repeat: checks that it runs

Data, generated here (seeded, written in chunks of 10^6 rows, so the generator never holds a whole log): a table
user_id, item_id, timestamp with num_users = n / 50 (uniform activity, ~50 interactions a user) and
num_items = min(n / 100, 10^6) whose popularity follows a power law (p(rank r) ∝ r^-1.0, as item popularity in
recommendation logs roughly does), times increasing through the file with a jitter of a day so that each user's rows
need the time sort. Parquet (row groups of 10^6, integer columns) and CSV; and, for the readers of lines, the same
log as a sequence file (one line per user, "user item item ...", in time order; format "sequence") and as a
MovieLens ratings.dat (user::item::rating::timestamp; format "movielens"), both built in memory (up to ~10^7).
Preparation is the default pipeline: 5-core, stable per-user time sort, ids remapped, written to a fresh cache (Arrow).

Each measurement runs in a child process (a fresh interpreter: nothing cached in memory, no allocator state from
earlier runs); its peak RSS is the kernel's (`os.wait4`'s ru_maxrss, which covers the whole child, imports included:
torch and transformers come with the package; the floor, a child that only imports, is reported beside) and its
time the child's own wall time of the `prepare_dataset` call (hashing the input for the cache key included). `--baseline` also runs, at the smallest size, the pipeline as it
was before the columnar rewrite (training/data.py of BASELINE_COMMIT, loaded from git: Python lists, to_pylist,
JSON cache), interleaved with the new one round by round, for the ratio on the same machine; for the line formats
it is instead today's pipeline with the file read row by row (the readers' fallback, `--pipeline rows`).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1_000_000
BASELINE_COMMIT = "2ffa2c1"  # the last commit whose training/data.py built Python lists and a JSON cache


# format on the command line → (file suffix, DataArguments.format)
FORMATS = {"parquet": ("parquet", "table"), "csv": ("csv", "table"), "sequence": ("txt", "sequence"),
           "dat": ("dat", "movielens")}
LINE_FORMATS = ("sequence", "dat")


def generate(n: int, fmt: str, directory: Path, seed: int = 0) -> Path:
    """The synthetic log of n interactions as `fmt` (see FORMATS) in `directory`, generated once (a file of the
    same n, format and seed is reused)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = directory / f"interactions-{n}-seed{seed}.{FORMATS[fmt][0]}"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_users, num_items = max(n // 50, 10), max(min(n // 100, 1_000_000), 10)
    popularity = np.cumsum(1.0 / np.arange(1, num_items + 1))
    popularity /= popularity[-1]
    item_names = rng.permutation(num_items)  # popularity is not in id order
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def chunks():
        for start in range(0, n, CHUNK):
            rows = min(CHUNK, n - start)
            users = rng.integers(0, num_users, rows)
            items = item_names[np.searchsorted(popularity, rng.random(rows))]
            times = 1_500_000_000 + (start + np.arange(rows)) * 10 + rng.integers(0, 86_400, rows)
            yield users, items, times

    if fmt in LINE_FORMATS:
        _write_lines(partial, fmt, [np.concatenate(column) for column in zip(*chunks())], rng)
    else:
        writer = pq.ParquetWriter(partial, schema) if fmt == "parquet" else pacsv.CSVWriter(str(partial), schema)
        with writer:
            for users, items, times in chunks():
                writer.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}, schema=schema))
    os.rename(partial, path)
    return path


def _write_lines(path: Path, fmt: str, columns: list[np.ndarray], rng: np.random.Generator) -> None:
    """The log as a sequence file (each user's items in time order, users in order of their first event) or as a
    ratings.dat (rows in file order, a random rating 1–5)."""
    users, items, times = columns
    with open(path, "w") as f:
        if fmt == "dat":
            ratings = rng.integers(1, 6, len(users))
            for start in range(0, len(users), CHUNK):
                rows = slice(start, start + CHUNK)
                f.writelines(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in
                             zip(users[rows].tolist(), items[rows].tolist(), ratings[rows].tolist(), times[rows].tolist()))
            return
        order = np.lexsort((times, users))
        first = np.unique(users, return_index=True)[1]  # users ascending, each one's first row in the file
        bounds = np.searchsorted(users[order], np.unique(users))
        ends = np.append(bounds[1:], len(order))
        for k in np.argsort(first, kind="stable"):
            f.write(f"{users[order[bounds[k]]]} " + " ".join(map(str, items[order[bounds[k]:ends[k]]].tolist())) + "\n")


def child(path: str, pipeline: str, cache_dir: str, load: bool) -> None:
    """In the child: prepare `path` (or, with load, load it from the cache the previous child wrote) and print the
    result as one JSON line."""
    sys.path.insert(0, str(ROOT))
    if pipeline == "baseline":
        import importlib.util

        source = Path(cache_dir) / "baseline_data.py"
        spec = importlib.util.spec_from_file_location("m2rec.training.data_baseline", source)
        data = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = data  # dataclasses look their module up there
        spec.loader.exec_module(data)
    else:
        from m2rec.training import data
    if pipeline == "rows":  # today's pipeline with the line readers' columnar path refused: their row-by-row fallback
        def refuse(*args):
            raise data._ReadRowByRow("bench: --pipeline rows")
        data._sequence_columns = data._movielens_columns = refuse
    if path == "-":  # the floor: what importing the package costs, before any data
        print(json.dumps({"seconds": 0.0}))
        return
    fmt = next(name for name, (suffix, _) in FORMATS.items() if path.endswith("." + suffix))
    args = data.DataArguments(format=FORMATS[fmt][1], data_path=path, cache_dir=cache_dir)
    start = time.perf_counter()
    prepared = data.prepare_dataset(args)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "users": prepared.num_users, "items": prepared.num_items,
                      "interactions": prepared.num_interactions, "cache_bytes": _size(prepared.path)}))


def _size(directory) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file()) if directory else 0


def run_child(path: Path, pipeline: str, cache_dir: Path, load: bool = False) -> dict:
    """One child's result, with its peak RSS (MiB): the child is reaped by os.wait4, so that ru_maxrss is its own."""
    command = [sys.executable, __file__, "--child", str(path), "--pipeline", pipeline, "--cache-dir", str(cache_dir)]
    if load:
        command.append("--load")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["child_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # the whole child, imports included
    return result


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def bench_size(n: int, fmt: str, data_dir: Path, repeats: int, baseline: bool) -> dict:
    path = generate(n, fmt, data_dir)
    other = "rows" if fmt in LINE_FORMATS else "baseline"
    pipelines = ["arrow", other] if baseline else ["arrow"]
    runs = {name: [] for name in pipelines}
    loads = []
    for _ in range(repeats):  # interleaved: each round runs every pipeline once, on a fresh cache
        for name in pipelines:
            cache = Path(tempfile.mkdtemp(prefix=f"bench-prepare-{name}-", dir=data_dir))
            try:
                if name == "baseline":  # the old pipeline's source, from git
                    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:training/data.py"],
                                            check=True, capture_output=True, text=True).stdout
                    (cache / "baseline_data.py").write_text(source)
                runs[name].append(run_child(path, name, cache))
                if name == "arrow":
                    loads.append(run_child(path, name, cache, load=True))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    result = {"interactions_in_file": n, "format": fmt, "file_bytes": path.stat().st_size, "repeats": repeats}
    for name, measured in runs.items():
        result[name] = {"seconds": summary([m["seconds"] for m in measured]),
                        "peak_rss_mib": summary([m["peak_rss_mib"] for m in measured]),
                        "child_cpu_seconds": summary([m.get("child_cpu_seconds", 0.0) for m in measured]),
                        **{key: measured[0][key] for key in ("users", "items", "interactions", "cache_bytes")}}
    result["arrow_load_from_cache"] = {"seconds": summary([m["seconds"] for m in loads]),
                                       "peak_rss_mib": summary([m["peak_rss_mib"] for m in loads])}
    if baseline:
        per_round = [b["seconds"] / a["seconds"] for a, b in zip(runs["arrow"], runs[other])]
        memory = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in zip(runs["arrow"], runs[other])]
        result[f"{other}_over_arrow"] = {"seconds": summary(per_round), "peak_rss": summary(memory)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--formats", nargs="+", default=["parquet", "csv"], choices=list(FORMATS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", action="store_true", help="also the old pipeline, at the smallest size")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "m2rec-bench-prepare"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="arrow", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.pipeline, args.cache_dir, args.load)
    if args.smoke:
        args.sizes, args.repeats = [1e5], 1
    data_dir = Path(args.data_dir)
    floor = run_child(Path("-"), "arrow", data_dir)["peak_rss_mib"]
    print(f"peak RSS of a child that only imports m2rec.training.data: {floor:.0f} MiB", flush=True)
    results = []
    for n in sorted(int(size) for size in args.sizes):
        for fmt in args.formats:
            started = time.perf_counter()
            result = bench_size(n, fmt, data_dir, args.repeats, args.baseline and n == int(min(args.sizes)))
            results.append(result)
            line = (f"{n:>11,} {fmt:8s} arrow: {result['arrow']['seconds']['median']:7.1f} s, "
                    f"{result['arrow']['peak_rss_mib']['median']:7.0f} MiB peak; load from cache "
                    f"{result['arrow_load_from_cache']['seconds']['median']:.2f} s, "
                    f"{result['arrow_load_from_cache']['peak_rss_mib']['median']:.0f} MiB")
            for other in ("baseline", "rows"):
                if other in result:
                    line += (f" | {other} {result[other]['seconds']['median']:.1f} s, "
                             f"{result[other]['peak_rss_mib']['median']:.0f} MiB")
            print(line + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    report = {"machine": {"cpu": _cpu(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                          "nice": os.nice(0)},
              "import_floor_peak_rss_mib": floor,
              "settings": {"chunk_rows": CHUNK, "baseline_commit": BASELINE_COMMIT, "user_core": 5, "item_core": 5},
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
