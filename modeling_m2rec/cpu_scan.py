"""Fused CPU kernels, C++ compiled on first use with torch's cpp_extension: the selective scan, and the causal
depthwise convolution (+ SiLU), which runs in one pass over channel-last memory instead of oneDNN's convolution
with its layout copies.

The plain-PyTorch scan materialises (B, D, T, N) tensors for every chunk of T steps and is bound by memory
traffic. The fused scan keeps each state in L1 cache, reads each input once and writes each output once; its
backward recomputes the states instead of storing them, so nothing of size (B, D, L, N) ever exists. Work runs in
parallel on torch's intra-op threads (at::parallel_for). Two variants:
- generic (every CPU, float32 and float64): one (batch, channel) row at a time, the loops over n vectorised by the
  compiler;
- AVX-512 (float32 where the CPU has AVX-512F, chosen at run time; `vector_width` 16): 16 channels per vector,
  reading channel-last (B, L, D) memory directly, the layout of the model's projections. About 1.7× the
  generic speed forward and backward on the paper's sizes;
- AVX2 (float32 where the CPU has AVX2 and FMA but no AVX-512F; `vector_width` 8): the AVX-512 variants'
  algorithms with each 16-channel step taken as two 8-float halves.
M2REC_VECTOR_ISA=avx2 or none runs a narrower variant than the CPU allows (`vector_isa` within a block), so that each
one is tested and timed on any CPU that has it.
The bias and softplus of delta, the D skip connection and the z gate are fused. The kernels are torch custom ops
(`kernel_ops`: scan_fwd, scan_bwd, conv_fwd, conv_bwd; and, inference only, window_sum, the causal filter's sum
over a cached step's window of items, and causal_filter, the filter summed directly over short whole sequences)
with fake implementations and autograd, so that torch.compile and torch.export trace through them.

Shapes: B batch, D channels (d_inner), L length, N state size; the conventions are those of
mamba-ssm's `selective_scan_fn` (see `kernels.selective_scan_ref`).

The C++ source is csrc/cpu_scan.cpp (embedded in cpu_scan_source.py). The extension is compiled once per source,
torch version and architecture into TORCH_EXTENSIONS_DIR (the first build takes one to two minutes on two cores,
announced by a warning before it starts) and loaded from there afterwards; `m2rec-build-kernels`
(`build_kernels_main`) builds it ahead of time. Where it cannot be built (no compiler, no ninja),
`load_cpu_scan` returns None and logs why once, and `selective_scan` falls back to the exact
plain-PyTorch path.
"""

import argparse
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from typing import List, Optional, Tuple  # the typing forms: what torch.library's schema inference reads everywhere

import torch

# The C++ lives in csrc/cpu_scan.cpp; this generated copy is what ships with a checkpoint's remote code.
from .cpu_scan_source import CPP_SOURCE


logger = logging.getLogger(__name__)


def _build_flags():
    """(compile flags, link flags): -O3; `omp simd` for the loops over n; -fno-trapping-math,
    without which GCC keeps the branches of the clamps in exp_vec and does not vectorise the
    backward loop (it changes no result: nothing here reads floating-point exception flags);
    OpenMP so that at::parallel_for runs on torch's thread pool (torch's Linux wheels ship
    libgomp, which the extension then shares)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    flags = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    if sys.platform.startswith("linux"):
        return flags + ["-fopenmp"], ["-fopenmp"]
    return flags, []


def _extension_name():
    # A new source, torch or Python version or architecture gets its own build folder instead of loading a
    # stale binary compiled for another one.
    key = "\n".join([CPP_SOURCE, torch.__version__, platform.machine(), repr(_build_flags()), sys.version])
    return "m2rec_cpu_scan_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_directory(name):
    """Where the extension is built: TORCH_EXTENSIONS_DIR, else torch's default (the XDG cache folder) / name."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(cache, "torch_extensions")
    return os.path.join(root, name)


# What a first use costs: measured on 2 cores, 47 s idle and 107 s while other jobs ran (one compiler process).
BUILD_TIME_HINT = "one to two minutes on 2 cores"


def _import_built(name, directory):
    """Imports a finished build directly. load_inline would first take its build lock, and a lock file left by a
    process killed while compiling makes every later load wait forever."""
    path = os.path.join(directory, name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if not os.path.exists(path):
        path = os.path.join(directory, name + ".so")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remove_stale_lock(directory, max_age_s=600):
    """A build takes a minute or two: a lock older than ten minutes belongs to a compile that was killed."""
    lock = os.path.join(directory, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > max_age_s:
        logger.warning("removing the stale build lock %s left by an interrupted compile", lock)
        os.remove(lock)


# Steps per time chunk of the AVX-512 backward: its per-thread buffers are 6 KB per step at N = 32, so 1,024
# steps keep them within 6 MB, where sequences of up to 1,024 steps run in one chunk and need no extra pass.
BACKWARD_CHUNK = 1024

_UNSET = object()
_module = _UNSET
_lock = threading.Lock()


def load_cpu_scan():
    """The compiled extension (with `fwd` and `bwd`), or None where it cannot be built.

    The first call compiles (or loads the cached build); later calls return the same answer. A
    failure is logged once with its reason, e.g. no C++ compiler or no ninja.
    """
    global _module
    with _lock:
        if _module is _UNSET:
            try:
                from torch.utils.cpp_extension import load_inline

                start = time.perf_counter()
                name = _extension_name()
                directory = _build_directory(name)
                _module = _import_built(name, directory)
                if _module is None:
                    logger.warning(
                        "compiling the fused CPU kernels of M2Rec (selective scan and causal convolution, C++) for "
                        "torch %s: the fast CPU path, built once per machine and torch version; this takes %s and "
                        "is cached in %s. To build ahead of time run `m2rec-build-kernels` (installed with m2rec); "
                        "to skip it set M2REC_DISABLE_FUSED_CPU=1 (the exact plain-PyTorch path, several times "
                        "slower on CPU).",
                        torch.__version__, BUILD_TIME_HINT, directory)
                    os.makedirs(directory, exist_ok=True)
                    _remove_stale_lock(directory)
                    _module = load_inline(
                        name=name,
                        cpp_sources=[CPP_SOURCE],
                        extra_cflags=_build_flags()[0],
                        extra_ldflags=_build_flags()[1],
                        build_directory=directory,
                        verbose=False,
                    )
                logger.info("fused CPU selective scan ready in %.1f s", time.perf_counter() - start)
            except Exception as error:  # any failure to build means: use the PyTorch scan
                logger.warning(
                    "could not build the fused CPU selective scan (%s: %s); the exact plain-PyTorch "
                    "scan will be used instead, which is several times slower on CPU (it needs a C++ "
                    "compiler and ninja; M2REC_DISABLE_FUSED_CPU=1 skips the attempt)",
                    type(error).__name__,
                    str(error).strip().splitlines()[-1] if str(error).strip() else "",
                )
                _module = None
        return _module


def env_flag(name, environ=os.environ):
    """Whether the environment variable `name` is set to something other than "" or "0"."""
    return environ.get(name, "0") not in ("", "0")


# The scan's variants by instruction set, as floats per vector: the kernels' `vector_width` argument.
VECTOR_WIDTHS = {"avx512": 16, "avx2": 8, "none": 0}


def _vector_isa_override(environ=os.environ):
    """M2REC_VECTOR_ISA: the widest scan variant allowed, one of VECTOR_WIDTHS' names ("none": the generic loops);
    unset or "auto", the widest the CPU has."""
    name = environ.get("M2REC_VECTOR_ISA", "auto").strip().lower()
    if name not in (*VECTOR_WIDTHS, "auto", ""):
        raise ValueError(f"M2REC_VECTOR_ISA={name!r}: use one of auto, {', '.join(VECTOR_WIDTHS)}")
    return VECTOR_WIDTHS.get(name, 16)


# The environment's overrides, read once at import (never inside a kernel call): M2REC_DISABLE_FUSED_CPU asks for the
# plain-PyTorch CPU path whatever the config says (to debug, benchmark, or skip the build), M2REC_VECTOR_ISA for a
# narrower scan variant than the CPU has (the tests switch these attributes to check every variant the CPU runs).
FUSED_CPU_DISABLED = env_flag("M2REC_DISABLE_FUSED_CPU")
VECTOR_WIDTH_ALLOWED = _vector_isa_override()


def cpu_vector_width(module=None):
    """The widest scan variant this CPU runs, in floats per vector: 16 (AVX-512F), 8 (AVX2 and FMA) or 0."""
    module = load_cpu_scan() if module is None else module
    return 0 if module is None else 16 if module.has_avx512() else 8 if module.has_avx2() else 0


@torch.compiler.assume_constant_result  # compile and export take the answer as a constant, never trace it
def vector_width():
    """The fused scan's variant, forward and backward, as the kernels' `vector_width` argument: the widest the CPU
    runs (`cpu_vector_width`) within what M2REC_VECTOR_ISA (`VECTOR_WIDTH_ALLOWED`) allows; 0, the generic loops,
    without either."""
    return min(cpu_vector_width(), VECTOR_WIDTH_ALLOWED)


@contextlib.contextmanager
def vector_isa(name):
    """Inside the block the fused scan runs at most the `name` variant ("avx512", "avx2", "none": see
    VECTOR_WIDTHS), as M2REC_VECTOR_ISA makes it for a whole process: to test or time each variant on a CPU that has
    a wider one. A backward follows its forward's choice."""
    global VECTOR_WIDTH_ALLOWED
    previous, VECTOR_WIDTH_ALLOWED = VECTOR_WIDTH_ALLOWED, VECTOR_WIDTHS[name]
    try:
        yield
    finally:
        VECTOR_WIDTH_ALLOWED = previous


@torch.compiler.assume_constant_result  # compile and export take the answer as a constant, never trace it
def fused_kernels_available():
    """Whether the extension is built (building or loading it on the first call; see `load_cpu_scan`)."""
    return load_cpu_scan() is not None


# The kernels as torch custom ops (torch.library), with fake implementations that give each output's shape and
# memory layout without running anything, and autograd formulas: torch.compile and torch.export trace through them
# instead of stopping at the extension's Python binding. Their namespace is the extension's name, so that a second
# copy of this module in one process (the installed package and a checkpoint's remote code) finds the ops of the same
# source already defined and uses them, while another source gets its own.
OPS_NAMESPACE = _extension_name()
Tensor = torch.Tensor


def _is_channel_last(t):
    """Whether t (B, D, L) is a transposed view of contiguous (B, L, D) memory (the C++ `channel_last_inputs`)."""
    return t.stride(1) == 1 and t.stride(2) == t.size(1) and t.stride(0) == t.size(1) * t.size(2)


def _empty_sequence_like(u, delta, z, width):
    """An empty (B, D, L) tensor laid out as the scan kernels lay out theirs: the vectorised variants (AVX-512,
    AVX2; `width` > 0 where the CPU has one), given float32 channel-last u, delta and z, write channel-last memory (a
    transposed view); every other case contiguous rows."""
    batch, dim, length = u.shape
    if (min(width, cpu_vector_width()) > 0 and u.dtype == torch.float32 and _is_channel_last(u)
            and _is_channel_last(delta) and (z is None or _is_channel_last(z))):
        return u.new_empty(batch, length, dim).transpose(1, 2)
    return u.new_empty(batch, dim, length)


def _define_ops():
    namespace = OPS_NAMESPACE

    @torch.library.custom_op(f"{namespace}::scan_fwd", mutates_args=())
    def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                 delta_bias: Optional[Tensor], initial_state: Optional[Tensor], softplus: bool,
                 width: int) -> Tuple[Tensor, Tensor]:
        """The extension's `fwd`: out (B, D, L) and the last state (B, D, N)."""
        out, last_state = load_cpu_scan().fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, width)
        return out, last_state.contiguous()  # without the kernel's padding of N to its vector lanes

    @scan_fwd.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, width):
        return _empty_sequence_like(u, delta, z, width), u.new_empty(u.shape[0], u.shape[1], A.shape[1])

    @torch.library.custom_op(f"{namespace}::scan_bwd", mutates_args=())
    def scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor], softplus: bool,
                 return_out: bool, chunk: int, width: int) -> List[Tensor]:
        """The extension's `bwd` without reusing its inputs (an op's outputs may not alias them): du, ddelta, dA, dB,
        dC, dD, dz, ddelta_bias, out, dinitial_state, each an empty (0,) tensor where not asked for."""
        grads = load_cpu_scan().bwd(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, return_out,
                                    False, chunk, width)
        small = (2, 5, 7, 9)  # dA, dD, ddelta_bias, dinitial_state: contiguous, as the fake gives them
        return [u.new_empty(0) if grad is None else grad.contiguous() if index in small else grad
                for index, grad in enumerate(grads)]

    @scan_bwd.register_fake
    def _(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, return_out, chunk, width):
        def sequence(present=True):
            return _empty_sequence_like(u, delta, z, width) if present else u.new_empty(0)

        def like(t):
            return u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

        return [sequence(), sequence(), like(A), like(B), like(C), like(D), sequence(z is not None), like(delta_bias),
                sequence(return_out), like(initial_state)]

    def scan_setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.softplus, ctx.width = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.mark_non_differentiable(output[1])  # the last state gets no gradient, as in mamba-ssm

    def scan_backward(ctx, dout, _dlast_state):
        *grads, _out, grad_initial_state = fused_backward(dout, *ctx.saved_tensors[:8], ctx.softplus, ctx.width,
                                                          initial_state=ctx.saved_tensors[8])
        return *grads, grad_initial_state, None, None  # softplus and width get none

    scan_fwd.register_autograd(scan_backward, setup_context=scan_setup_context)

    @torch.library.custom_op(f"{namespace}::conv_fwd", mutates_args=())
    def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
        """The extension's `conv_fwd`: out (B, D, L), a view of channel-last memory."""
        return load_cpu_scan().conv_fwd(x, weight, bias, silu)

    @conv_fwd.register_fake
    def _(x, weight, bias, silu):
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)

    @torch.library.custom_op(f"{namespace}::conv_bwd", mutates_args=())
    def conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> List[Tensor]:
        """The extension's `conv_bwd`: dx (B, D, L) (channel-last memory), dweight (D, K), dbias (D,) or, without a
        bias, an empty (0,) tensor."""
        dx, dweight, dbias = load_cpu_scan().conv_bwd(dout, x, weight, bias, silu)
        return [dx, dweight.contiguous(), x.new_empty(0) if dbias is None else dbias]

    @conv_bwd.register_fake
    def _(dout, x, weight, bias, silu):
        return [x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2), torch.empty_like(weight),
                x.new_empty(0) if bias is None else torch.empty_like(bias)]

    def conv_setup_context(ctx, inputs, output):
        x, weight, bias, ctx.silu = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.has_bias = bias is not None

    def conv_backward(ctx, dout):
        dx, dweight, dbias = kernel_ops.conv_bwd(dout, *ctx.saved_tensors, ctx.silu)
        return dx, dweight, dbias if ctx.has_bias else None, None

    conv_fwd.register_autograd(conv_backward, setup_context=conv_setup_context)

    @torch.library.custom_op(f"{namespace}::window_sum", mutates_args=())
    def window_sum(window_ids: Tensor, table: Tensor, kernel: Tensor) -> Tensor:
        """The extension's `window_sum`: (B, D). Inference only: no autograd formula (`kernels.filter_window_sum`
        takes the torch twin where a gradient is wanted)."""
        return load_cpu_scan().window_sum(window_ids, table, kernel)

    @window_sum.register_fake
    def _(window_ids, table, kernel):
        return table.new_empty(window_ids.shape[0], table.shape[1])

    @torch.library.custom_op(f"{namespace}::causal_filter", mutates_args=())
    def causal_filter(x: Tensor, kernel: Tensor) -> Tensor:
        """The extension's `causal_filter`: (B, D, L) as a view of channel-last memory. Inference only: no autograd
        formula (`kernels.causal_filter_convolution` takes the FFT convolution where a gradient is wanted)."""
        return load_cpu_scan().causal_filter(x, kernel).contiguous()  # an op's output may not be a view

    @causal_filter.register_fake
    def _(x, kernel):
        return x.new_empty(x.shape)


try:
    getattr(getattr(torch.ops, OPS_NAMESPACE), "scan_fwd")
except AttributeError:  # the first copy of this source in the process defines the ops
    _define_ops()
kernel_ops = getattr(torch.ops, OPS_NAMESPACE)  # scan_fwd, scan_bwd, conv_fwd, conv_bwd, window_sum, causal_filter


def fused_backward(dout, u, delta, A, B, C, D, z, delta_bias, softplus, width, initial_state=None,
                   return_out=False, reuse_inputs=False):
    """The extension's `bwd` (see its C++ comment) in time chunks of BACKWARD_CHUNK steps: du, ddelta, dA, dB, dC,
    dD, dz, ddelta_bias, with `return_out` the forward's output, and with `initial_state` its gradient (each None
    where not asked for). With `reuse_inputs` the caller gives up u, delta, z and dout, whose memory may then hold
    the results: in eager mode the extension is called directly for that, as an op's outputs may not alias its
    inputs; under compile or export the op runs (and allocates its outputs)."""
    if reuse_inputs and not torch.compiler.is_compiling():
        return load_cpu_scan().bwd(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, return_out,
                                   True, BACKWARD_CHUNK, width)
    grads = kernel_ops.scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, return_out,
                                BACKWARD_CHUNK, width)
    asked = (True, True, True, True, True, D is not None, z is not None, delta_bias is not None, return_out,
             initial_state is not None)
    return tuple(grad if wanted else None for grad, wanted in zip(grads, asked))


def traced_or_direct(name):
    """A fused inference kernel by its op's name in `kernel_ops`: the custom op while torch.compile or torch.export
    traces (they need the op), else the extension's own function, the same C++ without the op's Python dispatch."""
    if torch.compiler.is_compiling():
        return getattr(kernel_ops, name)
    return getattr(load_cpu_scan(), "fwd" if name == "scan_fwd" else name)


def _needs_op():
    """Whether a forward kernel runs as its custom op: for autograd (gradients enabled) and for compile and export,
    which trace the op. Without either the extension's function is called directly, the same C++ without the op's
    Python dispatch (autograd wrapper, redispatch): 20–40 µs a call, as much as a batch-1 convolution's own loop."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False
):
    """The fused CPU selective scan (the custom op `scan_fwd`, differentiable); same signature and result as
    `selective_scan_ref`.

    Args: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,); initial_state (B, D, N) or None (0).
    Returns out (B, D, L), and the last state (B, D, N), which gets no gradient, if `return_last_state`.
    Raises RuntimeError where the extension cannot be built (see `load_cpu_scan`).

    Both kernels apply the bias and softplus themselves and only the raw delta is kept: the backward recomputes the
    step block by block (N times less work than the scan) and returns the raw delta's gradient and the bias's, so
    that neither the (B, D, L) step nor its pre-activation is ever stored.
    """
    if not fused_kernels_available():
        raise RuntimeError("the fused CPU selective scan could not be built; see the log")
    # Half-precision inputs are computed in float32, as mamba-ssm does.
    out_dtype, compute_dtype = u.dtype, torch.float64 if u.dtype == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.to(compute_dtype)

    inputs = [cast(t) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    if _needs_op():
        out, last_state = kernel_ops.scan_fwd(*inputs, delta_softplus, vector_width())
    else:
        out, last_state = load_cpu_scan().fwd(*inputs, delta_softplus, vector_width())
        last_state = last_state.contiguous() if return_last_state else None  # as the op returns it
    out = out.to(out_dtype)
    return (out, last_state) if return_last_state else out


def causal_conv1d_cpu(x, weight, bias=None, activation=None):
    """The fused CPU causal depthwise convolution (the custom op `conv_fwd`, differentiable); same signature and
    result as `kernels.causal_conv1d_torch`: x (B, D, L), weight (D, K), bias (D,) or None, activation None, "silu"
    or "swish" -> (B, D, L).

    Raises RuntimeError where the extension cannot be built (see `load_cpu_scan`).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if not fused_kernels_available():
        raise RuntimeError("the fused CPU kernels could not be built; see the log")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    conv_fwd = kernel_ops.conv_fwd if _needs_op() else load_cpu_scan().conv_fwd
    out = conv_fwd(x.to(compute_dtype), weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype),
                   activation is not None)
    return out.to(x.dtype)


def filter_window_sum_cpu(window_ids, table, kernel):
    """The fused CPU window sum of the causal filter's cached step (the custom op `window_sum`, without gradient);
    same signature and result as `kernels.filter_window_sum_torch`: window_ids (B, W), table (I, D), kernel (W, D)
    or (W, 1) -> (B, D) float32 (float64 for a float64 kernel). An id outside 0..I−1 raises RuntimeError.

    Raises RuntimeError where the extension cannot be built (see `load_cpu_scan`).
    """
    if not fused_kernels_available():
        raise RuntimeError("the fused CPU kernels could not be built; see the log")
    compute_dtype = torch.promote_types(kernel.dtype, torch.float32)
    kernel = kernel.to(compute_dtype)
    if kernel.dim() == 2 and kernel.shape[1] == 1:  # a fixed filter's (W, 1) kernel, for every channel
        kernel = kernel.expand(-1, table.shape[1])
    return traced_or_direct("window_sum")(window_ids, table.to(compute_dtype), kernel)


def causal_filter_cpu(x, kernel, kernel_spectrum=None):
    """The causal filter summed directly over the lags by the fused CPU loop (the custom op `causal_filter`, without
    gradient); same signature and result as `kernels.causal_fft_convolution_torch`: x (B, D, L), kernel (D, W) or
    (1, W), lag 0 first (lags ≥ W, like lags > t, contribute nothing), kernel_spectrum not read → (B, D, L), a view
    of channel-last memory, in x's dtype (computed in float32, or float64 for float64 inputs).

    Raises RuntimeError where the extension cannot be built (see `load_cpu_scan`).
    """
    if not fused_kernels_available():
        raise RuntimeError("the fused CPU kernels could not be built; see the log")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    kernel = kernel.to(compute_dtype).expand(x.shape[1], -1)  # a fixed filter's (1, W) for every channel
    return traced_or_direct("causal_filter")(x.to(compute_dtype), kernel).to(x.dtype)


def build_kernels_main(argv=None):
    """`m2rec-build-kernels`: compile the fused CPU kernels ahead of time (e.g. while building a container image), or
    find the cached build, and say where they are cached and which vectorised scan variant runs on this CPU.
    Returns the exit status: 1 where they cannot be built (the model then runs the exact plain-PyTorch path)."""
    argparse.ArgumentParser(
        prog="m2rec-build-kernels",
        description="Build M2Rec's fused CPU kernels (selective scan, causal convolution) into TORCH_EXTENSIONS_DIR "
                    "now, so that the first model call does not compile them. Needs a C++ compiler and ninja.",
    ).parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")  # the loader's warnings, e.g. why a build failed
    directory = _build_directory(_extension_name())
    start = time.perf_counter()
    module = load_cpu_scan()
    if module is None:
        print("m2rec-build-kernels: error: the fused CPU kernels could not be built (the reason is logged above); "
              "M2Rec runs the exact plain-PyTorch path instead, several times slower on CPU", file=sys.stderr)
        return 1
    names = {width: name for name, width in VECTOR_WIDTHS.items()}
    variant = names[vector_width()]
    if cpu_vector_width(module) > vector_width():
        variant += f" (this CPU runs {names[cpu_vector_width(module)]}; M2REC_VECTOR_ISA asks for no wider)"
    print(f"fused CPU kernels ready ({time.perf_counter() - start:.1f} s), cached in {directory}")
    print(f"selective scan vectorised with: {variant}")
    if FUSED_CPU_DISABLED:
        print("note: M2REC_DISABLE_FUSED_CPU is set, so M2Rec will not use them until it is unset")
    return 0


__all__ = ["VECTOR_WIDTHS", "build_kernels_main", "causal_conv1d_cpu", "causal_filter_cpu", "cpu_vector_width",
           "env_flag", "filter_window_sum_cpu", "fused_backward", "fused_kernels_available", "kernel_ops",
           "load_cpu_scan", "selective_scan_cpu", "traced_or_direct", "vector_isa", "vector_width"]
