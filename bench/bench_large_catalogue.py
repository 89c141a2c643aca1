"""Training step time and peak memory at 10^5 and 10^6 items, full against sampled softmax (issue #17 §6).

    python bench/bench_large_catalogue.py --out docs/bench_large_catalogue.json
    python bench/bench_large_catalogue.py --smoke     # 2,000 items, batch 4 × 20, one round: checks that it runs

One training step = forward at every position of a batch of 64 histories × 200 items, the loss, backward and an
AdamW step, on M2Rec at the paper's sizes (d = 64, 1 layer, causal FFT) without the text buffer (`fusion="none"`:
the frozen (I, E) text table is 4 GB at 10^6 items and E = 1,024 whatever the loss; it is not what this measures).
Data: synthetic, generated here: item popularity follows a power law (Zipf, p(rank r) ∝ r^-1.0, the ranks shuffled
over the ids), histories are 201 draws from it, and the popularity sampler's training counts are those of a log of
10^6 more draws.

Each configuration runs in its own child process, which builds the model and optimizer, runs one warm-up step, then
times STEPS steps (median), and reports the peak resident memory of those steps (VmHWM, reset after the warm-up:
the whole process, with the model, AdamW's states and the step's own memory), the growth during them over the
resident memory before them, and the peak of the first step (which allocates AdamW's states). The children run in rounds,
every configuration once per round (bench/timing.py's method: a ratio is taken within a round, where both rows met
the same machine, and reported as the median over the rounds with its range).
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_scan import _read_status_kib  # noqa: E402
from bench.timing import ratio  # noqa: E402
from m2rec import M2RecConfig, M2RecForSequentialRecommendation  # noqa: E402

CATALOGUES = (100_000, 1_000_000)
BATCH, LENGTH = 64, 200
NUM_NEGATIVES = 1024
STEPS = 3
ROUNDS = 5
ZIPF_EXPONENT = 1.0
# name → M2RecConfig loss settings
LOSSES = {
    "full softmax": dict(loss="full_softmax"),
    "sampled, uniform": dict(loss="sampled_softmax", negative_sampler="uniform", num_negatives=NUM_NEGATIVES),
    "sampled, popularity": dict(loss="sampled_softmax", negative_sampler="popularity", num_negatives=NUM_NEGATIVES),
    "sampled, mixed": dict(loss="sampled_softmax", negative_sampler="mixed", num_negatives=NUM_NEGATIVES),
    "sampled, uniform per sequence": dict(loss="sampled_softmax", negative_sampler="uniform",
                                          num_negatives=NUM_NEGATIVES, negative_sharing="sequence"),
}


def power_law_items(num_items: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """count item ids in 1..num_items drawn with p(rank r) ∝ r^-ZIPF_EXPONENT, the ranks shuffled over the ids."""
    popularity = torch.arange(1, num_items + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
    ids_by_rank = torch.randperm(num_items, generator=generator) + 1
    return ids_by_rank[torch.multinomial(popularity, count, replacement=True, generator=generator)]


def child(num_items: int, loss: str, batch: int, length: int, steps: int) -> dict:
    """One configuration in this process: {"step_seconds", "peak_rss_mb", "step_growth_mb", "loss"}."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=num_items, max_len=length, fusion="none",
                                                         **LOSSES[loss])).train()
    if model.config.negative_sampler == "popularity":
        log = power_law_items(num_items, 1_000_000, generator)
        model.set_item_counts(torch.bincount(log, minlength=num_items + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sequences = power_law_items(num_items, batch * (length + 1), generator).view(batch, length + 1)
    input_ids, labels = sequences[:, :-1], sequences[:, 1:]

    def step():
        value = model(input_ids, labels=labels, return_logits=False).loss
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.item()

    step()  # warm-up: AdamW's states, thread pools
    first_step_peak = _read_status_kib("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the high-water mark to the current resident size
    before = _read_status_kib("VmRSS")
    seconds, values = [], []
    for _ in range(steps):
        start = time.perf_counter()
        values.append(step())
        seconds.append(time.perf_counter() - start)
    peak = _read_status_kib("VmHWM")
    return {"step_seconds": statistics.median(seconds), "peak_rss_mb": peak / 1024,
            "first_step_peak_rss_mb": first_step_peak / 1024, "rss_before_steps_mb": before / 1024,
            "step_growth_mb": (peak - before) / 1024, "loss": values[-1]}


def run_child(num_items, loss, batch, length, steps) -> dict:
    # The allocator returns every block above 1 MiB to the OS, so that a step's peak is its own (bench/bench_scan.py).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    command = [sys.executable, __file__, "--child", str(num_items), loss, "--batch", str(batch), "--length",
               str(length), "--steps", str(steps)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{num_items} items, {loss}: child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--smoke", action="store_true", help="2,000 items, batch 4 × 20, one round")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES),
                        help="the losses to run (the full softmax is the ratios' baseline)")
    parser.add_argument("--full_softmax_rounds_at_1m", type=int, default=None,
                        help="run the full softmax at 10^6 items in the first N rounds only (a step takes minutes "
                             "on 2 cores); its ratios are then taken over those rounds")
    parser.add_argument("--child", nargs=2, metavar=("NUM_ITEMS", "LOSS"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.batch, args.length, args.steps)))
        return
    catalogues, rounds = ((2_000,), 1) if args.smoke else (CATALOGUES, args.rounds)
    batch, length = (4, 20) if args.smoke else (args.batch, args.length)
    runs = {(items, loss): [] for items in catalogues for loss in args.losses}
    for round_index in range(rounds):
        for (items, loss), results in runs.items():
            if (items == 1_000_000 and loss == "full softmax" and args.full_softmax_rounds_at_1m is not None
                    and round_index >= args.full_softmax_rounds_at_1m):
                continue
            results.append(run_child(items, loss, batch, length, args.steps))
            print(f"round {round_index + 1}/{rounds}: {items:,} items, {loss}: "
                  f"{results[-1]['step_seconds']:.2f} s/step, peak {results[-1]['peak_rss_mb']:,.0f} MB",
                  file=sys.stderr, flush=True)
    rows = []
    for (items, loss), results in runs.items():
        if not results:  # the full softmax at 10^6 items with --full_softmax_rounds_at_1m 0
            continue
        seconds = [r["step_seconds"] for r in results]
        full = [r["step_seconds"] for r in runs.get((items, "full softmax"), [])]
        paired = min(len(full), len(seconds))  # the rounds that timed both
        rows.append({"num_items": items, "loss": loss, "step_seconds_median": statistics.median(seconds),
                     "step_seconds_range": [min(seconds), max(seconds)],
                     "time_vs_full": vars(ratio(seconds[:paired], full[:paired])) if paired else None,
                     "rounds_timed": len(results), "rounds_in_ratio": paired,
                     "peak_rss_mb_max": max(r["peak_rss_mb"] for r in results),
                     "first_step_peak_rss_mb_max": max(r["first_step_peak_rss_mb"] for r in results),
                     "step_growth_mb_max": max(r["step_growth_mb"] for r in results),
                     "loss_last_step": results[-1]["loss"], "rounds": results})
    report = {"batch": batch, "length": length, "num_negatives": NUM_NEGATIVES, "steps_per_child": args.steps,
              "rounds": rounds, "zipf_exponent": ZIPF_EXPONENT, "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "rows": rows}
    lines = [f"{'items':>10} {'loss':<22} {'s/step (range)':<22} {'time vs full':<20} {'peak RSS MB':>12}"]
    for row in rows:
        low, high = row["step_seconds_range"]
        lines.append(f"{row['num_items']:>10,} {row['loss']:<22} {row['step_seconds_median']:>7.2f} "
                     f"({low:.2f}–{high:.2f}){'':<4} {_fmt_ratio(row['time_vs_full']):<20} "
                     f"{row['peak_rss_mb_max']:>12,.0f}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out)
    return table


def _fmt_ratio(value: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value['median']:.3f} ({value['low']:.3f}–{value['high']:.3f})"


if __name__ == "__main__":
    main()
