"""The causal filter's convolution without gradient (inference and evaluation): the FFT convolution against the
direct sum over the lags of the fused CPU path, which `kernels.causal_filter_convolution` takes up to
`DIRECT_FILTER_MAX_LENGTH` positions, at the sizes of the shipped configs (64 channels, one kernel of L lags).

    OMP_NUM_THREADS=1 python bench/bench_filter.py --out docs/bench_filter.json

The two rows of one (B, L) run in interleaved rounds (bench/timing.py): each time is the median over the rounds,
the ratio direct / FFT the median of the per-round ratios with its range.
"""

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.timing import ROUNDS, interleaved_seconds, ratio  # noqa: E402
from m2rec import cpu_scan, kernels  # noqa: E402

SIZES = ((1, 50), (1, 200), (1, 400), (256, 50), (256, 200))  # (B, L)
CHANNELS = 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=[f"{b}x{length}" for b, length in SIZES],
                        help="B x L pairs, e.g. 1x200")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 rounds, to check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.rounds = ["1x8", "2x9"], 2
    if not cpu_scan.fused_kernels_available():
        sys.exit("the fused CPU kernels are not available here: nothing to compare")
    results = []
    lines = ["| B | L | FFT ms | direct ms | direct / FFT, median (min–max) |", "|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        batch, length = (int(part) for part in size.split("x"))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, length, CHANNELS, generator=generator).transpose(1, 2)  # (B, D, L) as the model has it
        kernel = torch.randn(CHANNELS, length, generator=generator)
        spectrum = kernels.causal_fft_kernel_spectrum(kernel, length)  # kept between calls by the model
        with torch.no_grad():
            seconds = interleaved_seconds({"fft": lambda: kernels.causal_fft_convolution(x, kernel, spectrum),
                                           "direct": lambda: cpu_scan.causal_filter_cpu(x, kernel)}, args.rounds)
        fft_ms, direct_ms = (sorted(seconds[name])[len(seconds[name]) // 2] * 1e3 for name in ("fft", "direct"))
        direct_vs_fft = ratio(seconds["direct"], seconds["fft"])
        lines.append(f"| {batch} | {length} | {fft_ms:.3f} | {direct_ms:.3f} | {direct_vs_fft} |")
        results.append({"batch": batch, "length": length, "seconds": seconds,
                        "ratio": dataclasses.asdict(direct_vs_fft)})
    table = "\n".join(lines)
    print(table)
    if args.out:
        environment = {"machine": platform.machine(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "vector_width": cpu_scan.vector_width()}
        Path(args.out).write_text(json.dumps({"environment": environment, "results": results}, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
