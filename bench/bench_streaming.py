"""Streaming inference (issue #14 §4): the latency and throughput of scoring one new event per user, and the state
kept per user between events, for M2Rec and SASRec, all rows in one run.

    OMP_NUM_THREADS=1 python bench/bench_streaming.py --out docs/bench_streaming.json

Every user has L − 1 past events and a new one; each row returns the top 10 items after the new event:
  M2Rec step           `recommend(new_items, cache_params=cache, k=10)`: the recurrent state continued by one event
  M2Rec re-encode      `recommend(histories, k=10)`: the whole history of L events encoded again
  SASRec KV step       the new position attends to the cached keys and values of the L − 1 before it
                       (`SASRecKVCache`, preallocated for L positions)
  SASRec re-encode     the whole history encoded again, logits at the last position
M2Rec is the full model (causal FFT filter, one AFFM layer, gate, 1024-d text buffer as with bge-large), SASRec the
comparison model of bench/sasrec.py (2 layers, 2 heads), both of width 64 over ML-1M's 3,416 items with
max_len = L, in eval mode. Histories are random item ids.

The four rows of one (L, B) run in rounds, called in turn one call at a time (bench/timing.py,
`alternating_call_seconds`); a row's latency in a round is the median of its calls there, its latency the median
over the rounds, throughput B over it, and each ratio the median of the per-round ratios with its range. (Until
session 16 a round timed the mean of back-to-back calls, whose batch-1 ratios moved by ±15 % on this VM.) State per
user: the bytes of every tensor in M2Rec's cache (the last max_len item ids, the convolution and SSM states, the
event count) and in SASRec's key/value cache (keys and values of L positions per layer), over B.
"""

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_efficiency import build  # noqa: E402
from bench.timing import ROUNDS, alternating_call_seconds, ratio  # noqa: E402

NUM_ITEMS = 3416  # ML-1M's catalogue
LENGTHS = (200, 2000)
BATCHES = (1, 256)
ROWS = ("M2Rec step", "M2Rec re-encode", "SASRec KV step", "SASRec re-encode")
# (name, numerator row, denominator row, whether the target bounds it from above, {(L, B): target}): the step's
# speed-ups must reach theirs, M2Rec's batch-1 time over SASRec's must stay under its own.
RATIOS = (
    ("M2Rec re-encode / step", "M2Rec re-encode", "M2Rec step", False, {(200, 256): 10.0, (2000, 256): 50.0}),
    ("SASRec re-encode / KV step", "SASRec re-encode", "SASRec KV step", False, {}),
    ("M2Rec step / SASRec KV step", "M2Rec step", "SASRec KV step", True, {}),
    ("M2Rec re-encode / SASRec re-encode", "M2Rec re-encode", "SASRec re-encode", True, {(200, 1): 1.0}),
)
STATE_TARGET = (2000, 0.2)  # at this L, M2Rec's state at most this fraction of SASRec's


def state_bytes(cache) -> int:
    """The bytes of every tensor a cache holds, directly or in per-layer lists."""
    tensors = [value for value in vars(cache).values() if isinstance(value, torch.Tensor)]
    tensors += [t for value in vars(cache).values() if isinstance(value, list) for t in value]
    return sum(t.numel() * t.element_size() for t in tensors)


def streaming_rows(length, batch, num_items):
    """The four rows' callables for one (L, B), {name: fn}, and each model's state bytes per user."""
    generator = torch.Generator().manual_seed(0)
    histories = torch.randint(1, num_items + 1, (batch, length), generator=generator)  # (B, L)
    past, new_items = histories[:, :-1], histories[:, -1:]  # (B, L − 1), (B, 1)
    torch.manual_seed(0)
    m2rec, sasrec = build("M2Rec", num_items, length).eval(), build("SASRec", num_items, length).eval()
    with torch.no_grad():
        m2rec_cache = m2rec(past, use_cache=True).cache_params
        sasrec_cache = sasrec(past, use_cache=True).cache_params
    past_lengths = sasrec_cache.lengths.clone()

    @torch.no_grad()
    def sasrec_step():
        sasrec_cache.lengths.copy_(past_lengths)  # every call scores the L-th event (learned positions end at L)
        return sasrec(new_items, cache_params=sasrec_cache, last_position_only=True).logits.topk(10)

    @torch.no_grad()
    def sasrec_reencode():
        return sasrec(histories, last_position_only=True).logits.topk(10)

    rows = {  # the M2Rec cache moves on by one event per call: a step costs the same at any event count
        "M2Rec step": lambda: m2rec.recommend(new_items, cache_params=m2rec_cache, k=10),
        "M2Rec re-encode": lambda: m2rec.recommend(histories, k=10),
        "SASRec KV step": sasrec_step,
        "SASRec re-encode": sasrec_reencode,
    }
    return rows, {"M2Rec": state_bytes(m2rec_cache) / batch, "SASRec": state_bytes(sasrec_cache) / batch}


def _target_cell(value, bound, at_most):
    if bound is None:
        return ""
    met = value.within(bound, at_most)
    return f" {'≤' if at_most else '≥'} {bound:g}: {'met' if met else 'not met'}"


def markdown(results):
    lines = ["| L | B | row | latency ms, median (min–max) | users/s |", "|---:|---:|---|---:|---:|"]
    for r in results:
        for name in ROWS:
            seconds = r["seconds"][name]
            median = statistics.median(seconds)
            lines.append(f"| {r['length']} | {r['batch']} | {name} | {median * 1e3:,.2f} "
                         f"({min(seconds) * 1e3:,.2f}–{max(seconds) * 1e3:,.2f}) | {r['batch'] / median:,.0f} |")
    lines += ["", "| L | B | ratio | median (min–max) | target |", "|---:|---:|---|---:|---|"]
    for r in results:
        for name, numerator, denominator, at_most, targets in RATIOS:
            value = ratio(r["seconds"][numerator], r["seconds"][denominator])
            bound = targets.get((r["length"], r["batch"]))
            lines.append(f"| {r['length']} | {r['batch']} | {name} | {value} |{_target_cell(value, bound, at_most)} |")
    lines += ["", "| L | M2Rec state bytes/user | SASRec KV cache bytes/user | M2Rec / SASRec | target |",
              "|---:|---:|---:|---:|---|"]
    for length in sorted({r["length"] for r in results}):
        state = next(r["state_bytes_per_user"] for r in results if r["length"] == length)
        fraction = state["M2Rec"] / state["SASRec"]
        target = ""
        if length == STATE_TARGET[0]:
            target = f"≤ {STATE_TARGET[1]:g}: {'met' if fraction <= STATE_TARGET[1] else 'not met'}"
        lines.append(f"| {length} | {state['M2Rec']:,.0f} | {state['SASRec']:,.0f} | {fraction:.3f} | {target} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--num-items", type=int, default=NUM_ITEMS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 rounds: checks that the script runs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.batches, args.rounds, args.num_items = [12], [1, 3], 2, 40

    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "rounds": args.rounds}
    print(json.dumps(environment), flush=True)
    results = []
    for length in args.lengths:
        for batch in args.batches:
            rows, state = streaming_rows(length, batch, args.num_items)
            seconds = alternating_call_seconds(rows, rounds=args.rounds)
            results.append({"length": length, "batch": batch, "seconds": seconds, "state_bytes_per_user": state})
            print(json.dumps(results[-1]), flush=True)
    table = markdown(results)
    print("\n" + table)
    if args.out is not None:
        args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
