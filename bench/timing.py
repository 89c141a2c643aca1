"""Timings of rows compared side by side, taken so that their ratios survive a noisy machine (issue #14 §5).

A shared machine's speed drifts by 10–20 % over minutes, so rows timed one after the other (all of A, then all of B)
give ratios that move as much between runs. Here the rows run in rounds, A, B, C, A, B, C, ..., each row timed once
per round; a ratio is taken within each round, where both rows met the same machine, and reported as the median
over the rounds with its range (min–max). A target counts as met only when the whole range meets it.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

ROUNDS = 5


@dataclass
class Ratio:
    """The ratio of two rows' times over the rounds: median, min, max."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}–{self.high:.2f})"

    def within(self, bound: float, at_most: bool = True) -> bool:
        """Whether the whole range is ≤ bound (at_most) or ≥ bound."""
        return self.high <= bound if at_most else self.low >= bound


def calls_per_timing(fn: Callable[[], object], min_seconds: float) -> int:
    """How many back-to-back calls of fn one timing needs to last about min_seconds, from one warm-up call (which
    also keeps one-time costs out of the timings): fast calls are timed in a batch so that the timer's resolution
    and one scheduler hiccup do not dominate them."""
    start = time.perf_counter()
    fn()
    warmup = time.perf_counter() - start
    return max(1, round(min_seconds / max(warmup, 1e-6)))


def interleaved_seconds(rows: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                        min_seconds: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each row in each round, {name: [seconds] * rounds}; the rows are timed in turn within a
    round (in the dict's order), each timing the mean of enough back-to-back calls to last about min_seconds."""
    calls = {name: calls_per_timing(fn, min_seconds) for name, fn in rows.items()}
    seconds = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            seconds[name].append((time.perf_counter() - start) / calls[name])
    return seconds


def alternating_call_seconds(rows: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                             min_seconds: float = 0.25) -> dict[str, list[float]]:
    """The median seconds of one call of each row in each round, {name: [seconds] * rounds}, for latencies: within a
    round the rows are called in turn, one timed call each, until every row has had enough calls to last about
    min_seconds (a row slower than that gets one call per round).

    For short calls (a batch-1 recommendation, about 2 ms) the mean of back-to-back calls moved by ±15 % from round to
    round on a shared 2-core VM (an interrupt or a full garbage collection lands in one row's batch and not in the
    other's); the median of single calls taken side by side, call by call, moved by ±3 %. The median is also what a
    latency is usually quoted as (p50)."""
    calls = {name: calls_per_timing(fn, min_seconds) for name, fn in rows.items()}
    seconds = {name: [] for name in rows}
    for _ in range(rounds):
        times = {name: [] for name in rows}
        for call in range(max(calls.values())):
            for name, fn in rows.items():
                if call < calls[name]:
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            seconds[name].append(statistics.median(values))
    return seconds


def ratio(numerator: list[float], denominator: list[float]) -> Ratio:
    """The per-round ratios numerator[r] / denominator[r] of two rows timed in the same rounds."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return Ratio(statistics.median(per_round), min(per_round), max(per_round))
