"""CPU benchmark of the selective scan and of the whole encoder at the paper's sizes (d_model 64, expand 2:
D = 128; N = 32), against a same-width causal-transformer (SASRec) layer and encoder.

For each sequence length L in {50, 200, 1000, 2000} the batch holds the same number of tokens as
B = 256, L = 200 (B = 51,200 // L), so every row does the same work per column and the columns
show how each implementation scales with L. Each row is timed on the forward alone (under
no_grad) and on forward + backward (with every input requiring a gradient).

Time: the rows of one length run in 5 interleaved rounds (bench/timing.py: row A, B, C, ..., A, B, C, ...; each
timing one call, or the mean of enough calls to last 50 ms, after a warm-up call); a row's time is the median over
the rounds, and each ratio between rows ("vs loop", "× transformer") the median of the per-round ratios with their
range (min–max), so that the machine's drift over minutes does not enter the ratios. Whatever memory allocator the
process has is used: glibc's by default, which hands blocks above its mmap threshold back to the OS and page-faults
them in again on every call. The environment block of the output records any MALLOC_* setting;
`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296` keeps freed memory in the process, as caching
allocators (jemalloc, tcmalloc) do, and so times the arithmetic without the page faults.

Memory: peak growth of resident memory during one call, each row and length in its own child process (Linux only;
"-" elsewhere), after one warm-up call, so that one-time costs (FFT plans, thread pools, the extension's load) and
what earlier rows left in the heap do not count. There glibc's mmap threshold is fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_), so every tensor above 1 MiB is returned to the OS when freed and resident memory follows
the live tensors instead of what the allocator keeps cached; before each call freed memory is trimmed and
/proc/self/clear_refs resets the kernel's high-water mark, after it the mark minus the resident size before the call
is reported. It counts everything the call allocates (outputs, gradients, temporaries), not the inputs. Timing is not
taken there: allocating from the OS is slower.

The layer rows map (B, L, 64) hidden states to (B, L, 64): a SASRec block (causal self-attention and feed-forward)
and its M2Rec counterpart (causal FFT filter and one AFFM layer: the Mamba mixer and feed-forward).
The encoder rows run from item ids to the user representation (B, L, 64), without the catalogue scoring that
every model shares: M2Rec (embedding, causal FFT filter, 1 AFFM layer, text gate with a 1024-d buffer) and SASRec
with 1 layer (2 heads, PyTorch's scaled_dot_product_attention).

Rows are (name, make) pairs: make(batch, length) returns the two callables to measure,
(forward, forward_and_backward), closing over their inputs. Add a row by appending to ROWS.

    python bench/bench_scan.py --out bench/scan.json
    python bench/bench_scan.py --rows layer encoder --lengths 1000 2000    # a subset of the rows
    python bench/bench_scan.py --smoke                                      # tiny sizes: checks that it runs
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.sasrec import SASRec, SASRecBlock, SASRecConfig  # noqa: E402
from bench.timing import ROUNDS, interleaved_seconds, ratio  # noqa: E402
from m2rec import M2RecConfig, M2RecModel, cpu_scan, kernels  # noqa: E402

TOKENS = 256 * 200
LENGTHS = (50, 200, 1000, 2000)
DIM, STATE = 128, 32  # d_inner = expand 2 x d_model 64; d_state 32


def scan_case(scan):
    """A row for a selective scan with the signature of `selective_scan_ref`, on the inputs the
    model gives it: softplus(delta + bias) step sizes, the D skip and the z gate."""

    def make(batch, length):
        gen = torch.Generator().manual_seed(0)
        inputs = {
            "u": torch.randn(batch, DIM, length, generator=gen),
            "delta": torch.randn(batch, DIM, length, generator=gen) - 2.0,
            "A": -torch.arange(1, STATE + 1, dtype=torch.float32).repeat(DIM, 1),  # S4D-real init
            "B": torch.randn(batch, STATE, length, generator=gen),
            "C": torch.randn(batch, STATE, length, generator=gen),
            "D": torch.ones(DIM),
            "z": torch.randn(batch, DIM, length, generator=gen),
            "delta_bias": torch.randn(DIM, generator=gen) * 0.5,
        }
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        grad_out = torch.randn(batch, DIM, length, generator=gen)

        def forward():
            with torch.no_grad():
                scan(**inputs, delta_softplus=True)

        def forward_backward():
            for leaf in leaves.values():
                leaf.grad = None
            scan(**leaves, delta_softplus=True).backward(grad_out)

        return forward, forward_backward

    return make


def module_case(build, make_inputs):
    """A row for a module: forward under no_grad in eval mode, forward + backward of a random projection of its
    output in train mode (dropout 0, so both do the same arithmetic)."""

    def make(batch, length):
        torch.manual_seed(0)
        module = build(length)
        inputs = make_inputs(batch, length)

        def forward():
            module.eval()
            with torch.no_grad():
                module(inputs)

        def forward_backward():
            module.train()
            module.zero_grad(set_to_none=True)
            output = module(inputs)
            output.backward(torch.ones_like(output))

        return forward, forward_backward

    return make


def item_ids(batch, length):
    return torch.randint(1, 3417, (batch, length), generator=torch.Generator().manual_seed(0))


class M2RecEncoder(torch.nn.Module):
    def __init__(self, length):
        super().__init__()
        self.model = M2RecModel(M2RecConfig(num_items=3416, max_len=max(LENGTHS), hidden_dropout_prob=0.0))

    def forward(self, input_ids):
        return self.model(input_ids).last_hidden_state


class SASRecEncoder(torch.nn.Module):
    def __init__(self, length):
        super().__init__()
        self.model = SASRec(SASRecConfig(num_items=3416, max_len=max(LENGTHS), num_hidden_layers=1,
                                         hidden_dropout_prob=0.0))

    def forward(self, input_ids):
        return self.model(input_ids, return_logits=False).last_hidden_state


class M2RecBlock(torch.nn.Module):
    """M2Rec's counterpart of a transformer layer: the causal FFT filter and one AFFM layer (Mamba mixer with its
    selection read from the unfiltered input, as in Algorithm 2, then the feed-forward), (B, L, 64) → (B, L, 64)."""

    def __init__(self, length):
        super().__init__()
        model = M2RecModel(M2RecConfig(num_items=1, max_len=max(LENGTHS), hidden_dropout_prob=0.0))
        self.frequency_filter, self.layer = model.frequency_filter, model.layers[0]

    def forward(self, hidden_states):
        return self.layer(self.frequency_filter(hidden_states), hidden_states)


def transformer_layer(length):
    return SASRecBlock(SASRecConfig(num_items=1, hidden_size=64, num_attention_heads=2, hidden_dropout_prob=0.0))


def layer_inputs(batch, length):
    return torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(0))


def selective_scan_generic_loops(*args, **kwargs):
    """The fused CPU scan with its vectorised variants switched off: the loops that CPUs without AVX2 run."""
    with cpu_scan.vector_isa("none"):
        return cpu_scan.selective_scan_cpu(*args, **kwargs)


LOOP = "per-step loop (selective_scan_ref)"  # the baseline of the "vs loop" columns
TRANSFORMER = "causal transformer layer (SASRec block, d 64)"  # the baseline of the "× transformer" columns
ROWS = [
    ("selective_scan (dispatcher)", scan_case(kernels.selective_scan)),
    ("selective_scan (fused CPU, generic loops)", scan_case(selective_scan_generic_loops)),
    ("selective_scan_torch", scan_case(kernels.selective_scan_torch)),
    (LOOP, scan_case(kernels.selective_scan_ref)),
    (TRANSFORMER, module_case(transformer_layer, layer_inputs)),
    ("M2Rec layer (FFT filter + AFFM layer, d 64)", module_case(M2RecBlock, layer_inputs)),
    ("M2Rec encoder (1 layer)", module_case(M2RecEncoder, item_ids)),
    ("SASRec encoder (1 layer)", module_case(SASRecEncoder, item_ids)),
]


def _read_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mb(fn):
    """Runs fn once; returns the peak growth of resident memory in MB (see the module docstring)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the high-water mark to the current resident size
    before = _read_status_kib("VmRSS")
    fn()
    return (_read_status_kib("VmHWM") - before) / 1024


def warm_peak_memory_mb(fn):
    """peak_memory_mb of a second call: one-time costs (FFT plans, thread pools, lazily built buffers) are not
    per-call memory."""
    fn()
    return peak_memory_mb(fn)


def measure_memory(rows, lengths, tokens):
    """{(name, length): (forward MB, forward+backward MB)}, each pair from its own child process (Linux)."""
    if not sys.platform.startswith("linux"):
        return {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    peaks = {}
    for name, _ in rows:
        for length in lengths:
            command = [sys.executable, __file__, "--memory-child", "--rows", name, "--lengths", str(length),
                       "--tokens", str(tokens)]
            child = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            peaks[name, length] = tuple(json.loads(child.stdout))
    return peaks


def memory_child(make, length, tokens):
    """Prints [forward MB, forward+backward MB] of one row at one length, each after a warm-up call."""
    kernels.resolve_backend("cpu")  # loads the fused extension before anything is measured
    print(json.dumps([warm_peak_memory_mb(fn) for fn in make(tokens // length, length)]))


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def _time_ratios(numerator, denominator):
    """'forward / fwd+bwd': the per-round time ratios numerator over denominator, median (min–max); '-' without
    either row."""
    if numerator is None or denominator is None:
        return "-"
    return " / ".join(str(ratio(numerator[key], denominator[key])) for key in ("forward_seconds",
                                                                               "forward_backward_seconds"))


def _memory_ratios(row, base):
    """'forward / fwd+bwd': row's peak memory over base's, '-' where either is missing."""
    if base is None:
        return "-"
    keys = ("forward_peak_mb", "forward_backward_peak_mb")
    return " / ".join("-" if row[k] is None or not base[k] else f"{row[k] / base[k]:.2f}" for k in keys)


def markdown(results):
    """The table of docs/BENCHMARKS.md: "vs loop" is the loop's time over the row's (higher is faster); "×
    transformer" is the row's time or memory over the transformer layer's (lower is better), forward / fwd+bwd;
    time ratios are per-round medians with their range."""
    lines = [
        "| implementation | L | B | forward ms | fwd+bwd ms | forward peak MB | fwd+bwd peak MB "
        "| vs loop, forward / fwd+bwd | time × transformer, forward / fwd+bwd | memory × transformer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    loop = {r["length"]: r for r in results if r["name"] == LOOP}
    transformer = {r["length"]: r for r in results if r["name"] == TRANSFORMER}
    for r in results:
        base = loop.get(r["length"])
        lines.append(
            f"| {r['name']} | {r['length']} | {r['batch']} | {_fmt(r['forward_s'] * 1e3)} "
            f"| {_fmt(r['forward_backward_s'] * 1e3)} | {_fmt(r['forward_peak_mb'])} "
            f"| {_fmt(r['forward_backward_peak_mb'])} "
            f"| {_time_ratios(base, r)} | {_time_ratios(r, transformer.get(r['length']))} "
            f"| {_memory_ratios(r, transformer.get(r['length']))} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--rows", nargs="+", help="run only the rows whose name contains one of these strings")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch (B = tokens // L)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 2 rounds, no memory children: checks that the script runs")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = [(name, make) for name, make in ROWS if not args.rows or any(part in name for part in args.rows)]
    if args.memory_child:
        memory_child(dict(ROWS)[args.rows[0]], args.lengths[0], args.tokens)
        return
    if args.smoke:
        args.lengths, args.tokens, args.rounds = [8], 32, 2

    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "scan_backend_cpu": kernels.resolve_backend("cpu"),
        "cpu_scan_vector_width": cpu_scan.vector_width(),
        "tokens_per_batch": args.tokens,
        "rounds": args.rounds,
        "D": DIM,
        "N": STATE,
        "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
    }
    print(json.dumps(environment), flush=True)
    results = []
    for length in args.lengths:
        batch = args.tokens // length
        cases = {name: make(batch, length) for name, make in rows}  # name: (forward, forward_and_backward)
        forward = interleaved_seconds({name: case[0] for name, case in cases.items()}, rounds=args.rounds)
        forward_backward = interleaved_seconds({name: case[1] for name, case in cases.items()}, rounds=args.rounds)
        for name in cases:
            results.append({"name": name, "length": length, "batch": batch,
                            "forward_s": statistics.median(forward[name]), "forward_seconds": forward[name],
                            "forward_backward_s": statistics.median(forward_backward[name]),
                            "forward_backward_seconds": forward_backward[name]})
            print(json.dumps(results[-1]), flush=True)
    results.sort(key=lambda r: [name for name, _ in rows].index(r["name"]))  # the table lists each row's lengths
    memory = {} if args.smoke else measure_memory(rows, args.lengths, args.tokens)
    for r in results:
        peaks = memory.get((r["name"], r["length"]), (None, None))
        r["forward_peak_mb"], r["forward_backward_peak_mb"] = peaks
    table = markdown(results)
    print("\n" + table)
    if args.out is not None:
        args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
