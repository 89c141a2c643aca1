"""The model's kernels: Mamba's selective scan and causal depthwise convolution for every device, each with its
one-step form for streaming inference; the causal FFT convolution of the frequency filter; the full-softmax
cross-entropy of the scorer, its sampled-softmax alternative for large catalogues (`draw_negatives`,
`sampled_softmax_cross_entropy`), and the chunked top k over a large catalogue (`top_k_items`, twin
`top_k_items_torch`).

Each has a plain-PyTorch twin with the same signature and one dispatcher that runs the path of a
backend, chosen once per model call by `resolve_backend` (from `M2RecConfig.kernel_backend`, "auto" by
default) and passed to the dispatchers as `backend=`:

    backend "cuda" (CUDA tensors; mamba-ssm and/or causal-conv1d installed):
        selective_scan          -> mamba_ssm's `selective_scan_fn` (with `initial_state`: `selective_scan_torch`,
                                   as mamba-ssm's scan starts from 0)
        causal_conv1d           -> causal-conv1d's `causal_conv1d_fn` (widths 2 to 4)
        selective_state_update  -> mamba_ssm's `selective_state_update` (Triton)
        causal_conv1d_update    -> causal-conv1d's `causal_conv1d_update`
      (a kernel that is not installed falls back to its twin, logged once)
    backend "cpu_fused" (CPU tensors, a C++ compiler): the scan, the convolution, the filter's window sum of a
        cached step (`filter_window_sum`) and, without gradient, the causal filter over short sequences
        (`causal_filter_convolution`, a direct sum) run the fused C++ loops of `cpu_scan` (registered torch custom
        ops); the one-step forms of the scan and the convolution run their twins
    backend "torch": `selective_scan_torch` (exact, chunked), `causal_conv1d_torch`, `selective_state_update_torch`,
        `causal_conv1d_update_torch`, `filter_window_sum_torch`, on any device

The causal FFT convolution and the cross-entropy have no extension kernel: their memory-lean autograd functions
(`causal_fft_convolution`, which `causal_filter_convolution` runs wherever the direct sum does not, and
`full_softmax_cross_entropy`) are plain PyTorch and run on every backend; their twins
(`*_torch`, autograd through the obvious computation, which stores what the lean forms recompute) define them.

`selective_scan_ref`, a loop over time steps, and the other `*_ref` functions (float64) are the definitions the
paths are tested against.
Falling back to a slower path is logged once. M2REC_DISABLE_FUSED_CPU=1, read once at import
(`cpu_scan.FUSED_CPU_DISABLED`), turns the fused CPU paths off (to debug or benchmark the PyTorch
ones) whatever the config asks.

Shapes: B batch, D channels (d_inner), L length, N state size, W convolution width. Conventions of
mamba-ssm: u, delta, z (B, D, L); A (D, N), real; B, C (B, N, L), input-dependent; D, delta_bias
(D,); the SSM state h (B, D, N). The one-step forms take the same tensors without L and update
their state in place, as mamba-ssm's and causal-conv1d's do.
"""

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_scan
from .configuration_m2rec import KERNEL_BACKENDS
from .cpu_scan import (causal_conv1d_cpu, causal_filter_cpu, filter_window_sum_cpu, load_cpu_scan,
                       selective_scan_cpu)


try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # optional CUDA kernel: absent, or built for another torch/CUDA
    selective_scan_fn = None

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update as causal_conv1d_update_fn
except Exception:  # optional CUDA kernel
    causal_conv1d_fn = causal_conv1d_update_fn = None

try:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as selective_state_update_fn
except Exception:  # optional CUDA (Triton) kernel
    selective_state_update_fn = None


logger = logging.getLogger(__name__)
_logged = set()


def _log_once(message):
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False
):
    """The selective scan as its definition, one time step at a time (the reference for tests).

        delta <- softplus(delta + delta_bias)          (each step optional)
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,   h_{-1} = initial_state or 0      h: (B, D, N)
        y_t = C_t . h_t + D u_t;   out_t = y_t * silu(z_t)

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, N, L). D, delta_bias: (D,) or None.
        z: (B, D, L) or None. delta_softplus: apply softplus to delta (after the bias).
        initial_state: h_{-1} (B, D, N), or None for 0; it receives a gradient like every input.
    Returns:
        out (B, D, L) in u's dtype; with `return_last_state`, the tuple (out, h_{L-1} (B, D, N)) (h_{L-1} in
        float32, or float64 for float64 inputs).
    """
    dtype_in = u.dtype
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(compute_dtype)  # (B, D, N)
    ys = []
    # unbind: one view per step whose backward is one stack (indexing u[:, :, t] would make the
    # backward write a zero-filled gradient of u's full size at every step)
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(delta_t[..., None] * A)  # (B, D, N)
        h = decay * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def _chunk_length(batch, dim, state):
    """Steps per chunk of the PyTorch scan: the largest power of two in [4, 64] that keeps a
    chunk's (B, D, T, N) tensors under 2^22 elements. Long chunks cost log2(T) passes of the scan
    per step, short ones Python overhead per chunk; memory-bound CPUs favour short chunks at
    large B, small batches (and GPUs) long ones. A program traced for any batch size (torch.export with a dynamic
    batch) takes the shortest chunk, which bounds the memory of every batch it will see."""
    if not isinstance(batch, int):
        return 4
    length = 64
    while length > 4 and batch * dim * state * length > 2**22:
        length //= 2
    return length


def _write(destination, operation, *operands):
    """operation(*operands, out=destination): in eager mode straight into the (strided) destination, without a
    temporary; torch.compile cannot trace out= into a strided view, so there the result is copied in (and fused)."""
    if torch.compiler.is_compiling():
        destination.copy_(operation(*operands))
    else:
        operation(*operands, out=destination)


def _linear_scan(decay, x, reverse=False):
    """Solves s_t = decay_t * s_{t-1} + x_t along dim 2 with s_{-1} = 0 (or, with `reverse`,
    s_t = decay_t * s_{t+1} + x_t with s_T = 0).

    decay, x: (B, D, T, N), decay in [0, 1] when delta A <= 0. Returns s (B, D, T, N).

    Hillis-Steele: after the pass with offset k, each step holds the pair (decay product, sum) of
    its window of 2k steps, so log2(T) passes suffice. Products of decays can only underflow to
    0, never overflow. `decay` and `x` are overwritten.
    """
    length = x.shape[2]
    x_next, decay_next = torch.empty_like(x), torch.empty_like(decay)
    offset = 1
    while offset < length:
        # The slices of the steps that receive (dst) and the earlier ones they combine with (src).
        dst = slice(0, length - offset) if reverse else slice(offset, length)
        src = slice(offset, length) if reverse else slice(0, length - offset)
        keep = slice(length - offset, length) if reverse else slice(0, offset)
        x_next[:, :, keep] = x[:, :, keep]
        _write(x_next[:, :, dst], torch.addcmul, x[:, :, dst], decay[:, :, dst], x[:, :, src])
        x, x_next = x_next, x
        if 2 * offset < length:  # the last pass needs no decay products
            decay_next[:, :, keep] = decay[:, :, keep]
            _write(decay_next[:, :, dst], torch.mul, decay[:, :, dst], decay[:, :, src])
            decay, decay_next = decay_next, decay
        offset *= 2
    return x


class _ScanTorchFn(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t, chunk by chunk, from h_{-1} = h0.

    Args: u, dt (B, D, L); A (D, N); B, C (B, N, L); h0 (B, D, N); chunk: steps per chunk.
    Returns y (B, D, L) and the last state (B, D, N), which gets no gradient.

    Only the state entering each chunk is kept for the backward, which recomputes one chunk's
    (B, D, T, N) states at a time and runs the adjoint recurrence
    g_t = dy_t C_t + exp(dt_{t+1} A) * g_{t+1} with the same scan, backwards; what it carries out of
    the first step, exp(dt_0 A) * g_0, is the gradient of h0.
    """

    @staticmethod
    def _scan_inputs(h0, u, dt, A, B):
        """Decays exp(dt A) and inputs of `_linear_scan` (both (B, D, T, N)) for one chunk
        entered with the state h0 (B, D, N)."""
        decay = torch.exp(dt.unsqueeze(-1) * A.unsqueeze(1))  # (B, D, T, N)
        x = (dt * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (B, D, T, N)
        # Folding the entering state into the first input makes the scan yield h_t itself.
        x[:, :, 0] += decay[:, :, 0] * h0
        return decay, x

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk):
        h = h0  # (B, D, N)
        entering, ys = [], []
        for start in range(0, u.shape[-1], chunk):
            steps = slice(start, start + chunk)
            if any(ctx.needs_input_grad):
                entering.append(h)
            decay, x = _ScanTorchFn._scan_inputs(h, u[:, :, steps], dt[:, :, steps], A, B[:, :, steps])
            states = _linear_scan(decay, x)  # (B, D, T, N)
            ys.append(torch.einsum("bdtn,bnt->bdt", states, C[:, :, steps]))
            h = states[:, :, -1].clone()
        ctx.save_for_backward(u, dt, A, B, C, *entering)
        ctx.chunk = chunk
        h = h.clone() if h is h0 else h  # L = 0 returns h0 itself, which an autograd output must not be
        ctx.mark_non_differentiable(h)
        y = torch.cat(ys, dim=-1) if ys else u.new_zeros(u.shape)
        return y, h

    @staticmethod
    def backward(ctx, dy, _dlast_state):
        u, dt, A, B, C, *entering = ctx.saved_tensors
        chunk = ctx.chunk
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        carry = torch.zeros_like(entering[0]) if entering else None  # exp(dt_{t+1} A) g_{t+1}
        for index in reversed(range(len(entering))):
            steps = slice(index * chunk, (index + 1) * chunk)
            u_c, dt_c, dy_c = u[:, :, steps], dt[:, :, steps], dy[:, :, steps]  # (B, D, T)
            B_c, C_c = B[:, :, steps], C[:, :, steps]  # (B, N, T)
            h0 = entering[index]
            decay, x = _ScanTorchFn._scan_inputs(h0, u_c, dt_c, A, B_c)
            states = _linear_scan(decay.clone(), x)  # (B, D, T, N)
            # g_t = dy_t C_t + decay_{t+1} g_{t+1}; the step after the chunk enters as `carry`.
            x = dy_c.unsqueeze(-1) * C_c.transpose(1, 2).unsqueeze(1)  # (B, D, T, N)
            x[:, :, -1] += carry
            decay_after = torch.cat([decay[:, :, 1:], torch.ones_like(decay[:, :, :1])], dim=2)
            g = _linear_scan(decay_after, x, reverse=True)  # (B, D, T, N): dL/dh_t
            carry = decay[:, :, 0] * g[:, :, 0]
            states_before = torch.cat([h0.unsqueeze(2), states[:, :, :-1]], dim=2)  # h_{t-1}
            g_log_decay = g * states_before * decay  # dL/d(dt_t A), (B, D, T, N)
            dA += torch.einsum("bdtn,bdt->dn", g_log_decay, dt_c)
            g_B = torch.einsum("bdtn,bnt->bdt", g, B_c)  # sum_n g_t B_t
            du[:, :, steps] = dt_c * g_B
            ddt[:, :, steps] = torch.einsum("bdtn,dn->bdt", g_log_decay, A) + u_c * g_B
            dB[:, :, steps] = torch.einsum("bdtn,bdt->bnt", g, dt_c * u_c)
            dC[:, :, steps] = torch.einsum("bdtn,bdt->bnt", states, dy_c)
        return du, ddt, dA, dB, dC, carry, None


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False
):
    """The selective scan in plain PyTorch, exact and for any device; same signature and result
    as `selective_scan_ref`.

    The sequence is cut into chunks of T steps (see `_chunk_length`), each scanned in parallel
    (`_linear_scan`), with a Python loop carrying the (B, D, N) state from chunk to chunk. Memory
    is O(B D L + B D N L / T + B D T N): the backward recomputes states chunk by chunk instead of
    keeping (B, D, L, N).
    """
    dtype_in = u.dtype
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    h0 = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(compute_dtype)
    y, h = _ScanTorchFn.apply(u, delta, A, B, C, h0, _chunk_length(batch, dim, A.shape[1]))
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


@torch.compiler.assume_constant_result  # compile and export take the answer as a constant, never trace it
def resolve_backend(device, requested="auto"):
    """The backend the kernels run for tensors on `device` when `requested` (an `M2RecConfig.kernel_backend`) is
    asked for: "cuda", "cpu_fused" or "torch". The model calls it once per call and passes the answer to every
    kernel; a path that "auto" passes over for lack of its kernels is logged once.

    Raises ValueError for an unknown name or a backend that does not run on `device`, and RuntimeError where the
    requested kernels are unavailable (mamba-ssm and causal-conv1d not installed, the C++ extension not built).
    """
    _check_backend(requested)
    device = torch.device(device)
    cuda_kernels = selective_scan_fn is not None or causal_conv1d_fn is not None
    if requested == "torch":
        return "torch"
    if requested == "cuda":
        if device.type != "cuda":
            raise ValueError(f"kernel_backend='cuda' runs on CUDA tensors, got {device.type} ones")
        if not cuda_kernels:
            raise RuntimeError("kernel_backend='cuda' needs mamba-ssm or causal-conv1d (pip install -e '.[cuda]')")
        return "cuda"
    if requested == "cpu_fused" and device.type != "cpu":
        raise ValueError(f"kernel_backend='cpu_fused' runs on CPU tensors, got {device.type} ones")
    if device.type == "cuda":
        if not cuda_kernels:
            _log_once("mamba-ssm is not installed: the selective scan runs in plain PyTorch on CUDA")
            return "torch"
        return "cuda"
    if device.type != "cpu":
        return "torch"
    if cpu_scan.FUSED_CPU_DISABLED:
        _log_once("M2REC_DISABLE_FUSED_CPU is set: the selective scan runs in plain PyTorch")
        return "torch"
    if load_cpu_scan() is not None:
        return "cpu_fused"
    if requested == "cpu_fused":
        raise RuntimeError("kernel_backend='cpu_fused' but the fused CPU kernels could not be built (the reason is "
                           "logged); kernel_backend='auto' falls back to plain PyTorch")
    _log_once("fused CPU selective scan unavailable: the selective scan runs in plain PyTorch")
    return "torch"


def _check_backend(backend):
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend={backend!r} is not supported; choose one of {KERNEL_BACKENDS}")


def _selective_scan_cuda(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False
):
    """mamba-ssm's CUDA scan, which always starts from h = 0: a scan that continues a state runs in
    plain PyTorch instead (never with the initial state dropped), as does every scan without mamba-ssm."""
    if selective_scan_fn is None:
        _log_once("mamba-ssm is not installed: the selective scan runs in plain PyTorch on CUDA")
        return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus, initial_state=initial_state,
                                    return_last_state=return_last_state)
    if initial_state is not None:
        _log_once("mamba-ssm's selective scan takes no initial state: a scan from a given state runs in plain "
                  "PyTorch on CUDA")
        return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus, initial_state=initial_state,
                                    return_last_state=return_last_state)
    return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                             return_last_state=return_last_state)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False, backend=None
):
    """The selective scan on `backend`'s path (a `resolve_backend` answer; None resolves "auto" for u's device);
    same signature and result as `selective_scan_ref`.

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, N, L). D, delta_bias: (D,) or None.
        z: (B, D, L) or None. delta_softplus: apply softplus to delta + delta_bias.
        initial_state: the state before the first step (B, D, N), or None for 0.
    Returns:
        out (B, D, L); with `return_last_state`, the tuple (out, last state (B, D, N)).
    """
    scan = {
        "cuda": _selective_scan_cuda,
        "cpu_fused": selective_scan_cpu,
        "torch": selective_scan_torch,
    }[resolve_backend(u.device) if backend is None else backend]
    return scan(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_last_state=return_last_state,
    )


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the selective scan, continuing `state`, which is updated in place: step t of
    `selective_scan_ref` for the same tensors without their L dimension (mamba-ssm's signature).

        dt <- softplus(dt + dt_bias)          (each part optional)
        state <- exp(dt A) * state + dt B x;   out = (C . state + D x) * silu(z)

    Args:
        state: (B, D, N), float32 (float64 for tests); the arithmetic runs in its dtype.
        x, dt: (B, D). A: (D, N). B, C: (B, N). D, dt_bias: (D,) or None. z: (B, D) or None.
    Returns:
        out (B, D) in x's dtype.
    """
    compute_dtype = state.dtype
    x_in, dt, A, B, C = (t.to(compute_dtype) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute_dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (B, D, N)
    state.mul_(decay).add_((dt * x_in).unsqueeze(-1) * B.unsqueeze(1))
    # A batched product, not einsum: at batch 1 einsum's own planning took longer than the step's arithmetic.
    y = (state @ C.unsqueeze(-1)).squeeze(-1)  # (B, D, N) @ (B, N, 1) → (B, D)
    if D is not None:
        y = y + x_in * D.to(compute_dtype)
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    return y.to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend=None):
    """One step of the selective scan on `backend`'s path (mamba-ssm's Triton kernel for "cuda" where installed;
    None resolves "auto" for state's device); same signature and result as `selective_state_update_torch`: state
    (B, D, N), updated in place; x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,) -> out (B, D)."""
    if (resolve_backend(state.device) if backend is None else backend) == "cuda":
        if selective_state_update_fn is not None:
            return selective_state_update_fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                             dt_softplus=dt_softplus)
        _log_once("mamba-ssm is not installed: the one-step state update runs in plain PyTorch on CUDA")
    return selective_state_update_torch(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def causal_conv1d_torch(x, weight, bias=None, activation=None):
    """Causal depthwise convolution: out[:, d, t] = sum_k weight[d, k] x[:, d, t - W + 1 + k].

    Args: x (B, D, L); weight (D, W); bias (D,) or None; activation None, "silu" or "swish".
    Returns: (B, D, L).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    dim, width = weight.shape
    # Padding W - 1 on both sides and keeping the first L outputs sees only the past. A channel-last view is made
    # contiguous first: oneDNN's depthwise convolution is several times slower on it than one copy costs.
    out = F.conv1d(x.contiguous(), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return F.silu(out) if activation is not None else out


def causal_conv1d(x, weight, bias=None, activation=None, backend=None):
    """Causal depthwise convolution on `backend`'s path (None resolves "auto" for x's device); same signature and
    result as `causal_conv1d_torch`: x (B, D, L), weight (D, W), bias (D,) -> (B, D, L)."""
    backend = resolve_backend(x.device) if backend is None else backend
    if backend == "cuda":
        # the CUDA kernel supports widths 2 to 4 (Mamba uses 4)
        if causal_conv1d_fn is not None and 2 <= weight.shape[1] <= 4:
            return causal_conv1d_fn(x, weight, bias, activation=activation)
        _log_once(
            "causal-conv1d is not installed (or not for this width): the convolution runs in plain PyTorch on CUDA"
        )
    elif backend == "cpu_fused":
        return causal_conv1d_cpu(x, weight, bias, activation=activation)
    return causal_conv1d_torch(x, weight, bias, activation=activation)


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation=None):
    """One step of `causal_conv1d_torch`, continuing `conv_state`, which is updated in place (causal-conv1d's
    signature): out = bias + sum_k weight[:, k] * window[:, :, k] over the window of the last W inputs (the
    state's newest W - 1 and x); then the state drops its oldest input and appends x.

    Args:
        x: (B, D). conv_state: (B, D, S) with S >= W - 1, the S inputs before x, oldest first (0 before the
            sequence's start). weight: (D, W). bias: (D,) or None. activation: None, "silu" or "swish".
    Returns:
        (B, D) in x's dtype.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    width = weight.shape[1]
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (B, D, S + 1)
    # a product and a sum, not einsum, whose planning outweighs a one-step arithmetic at batch 1
    out = (window[..., window.shape[-1] - width:] * weight.to(conv_state.dtype)).sum(dim=-1)  # (B, D)
    if bias is not None:
        out = out + bias.to(conv_state.dtype)
    conv_state.copy_(window[..., 1:])
    return (F.silu(out) if activation is not None else out).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One step of the causal depthwise convolution on `backend`'s path (causal-conv1d's kernel for "cuda" where
    installed; None resolves "auto" for x's device); same signature and result as `causal_conv1d_update_torch`:
    x (B, D), conv_state (B, D, S >= W - 1) updated in place, weight (D, W), bias (D,) -> (B, D)."""
    if (resolve_backend(x.device) if backend is None else backend) == "cuda":
        if causal_conv1d_update_fn is not None and 2 <= weight.shape[1] <= 4:
            return causal_conv1d_update_fn(x, conv_state, weight, bias, activation=activation)
        _log_once("causal-conv1d is not installed (or not for this width): the one-step convolution runs in "
                  "plain PyTorch on CUDA")
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation=activation)


__all__ = [
    "causal_conv1d",
    "causal_conv1d_torch",
    "causal_conv1d_update",
    "causal_conv1d_update_torch",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
    "selective_state_update",
    "selective_state_update_torch",
]


# ------------------------------------------------------------------------------------ causal FFT convolution


def causal_fft_kernel_spectrum(kernel, length):
    """The kernel's spectrum that the causal FFT convolution of an input of `length` steps multiplies by: kernel
    (D, ≥ L) or (1, ≥ L), its first L lags zero-padded to 2L → (D, L + 1) or (1, L + 1), complex. Computed once, it
    can be passed to the convolutions as `kernel_spectrum` for as long as the kernel does not change."""
    return torch.fft.rfft(kernel[..., :length], n=2 * length)


class _CausalFFTConvolution(torch.autograd.Function):
    """y[..., t] = Σ_{lag ≤ t} kernel[..., lag] x[..., t − lag] through FFTs zero-padded to 2L (no wrap-around):
    x (B, D, L), kernel (D, L) (or (1, L), one kernel for every channel, without a gradient) → (B, D, L); with
    `kernel_spectrum`, the kernel's transform given (`causal_fft_kernel_spectrum`), which gets no gradient.

    The backward keeps only x and the kernel: autograd through the FFTs would keep the zero-padded input and its
    spectrum, 2 × (B, D, 2L) floats. The gradients are causal correlations through the same FFTs, with x's spectrum
    recomputed. Spectra are multiplied in place: each complex product is a (B, D, L + 1) buffer, twice the input's
    size, that would otherwise be allocated (and page-faulted in) anew."""

    @staticmethod
    def forward(ctx, x, kernel, kernel_spectrum=None):
        ctx.save_for_backward(x, kernel)
        length, n = x.shape[-1], 2 * x.shape[-1]
        if kernel_spectrum is None:
            kernel_spectrum = causal_fft_kernel_spectrum(kernel, length)
        spectrum = torch.fft.rfft(x, n=n).mul_(kernel_spectrum)  # (B, D, n//2+1)
        return torch.fft.irfft(spectrum, n=n)[..., :length]

    @staticmethod
    def backward(ctx, grad_output):
        x, kernel = ctx.saved_tensors
        length, n = x.shape[-1], 2 * x.shape[-1]
        grad_spectrum = torch.fft.rfft(grad_output, n=n)  # (B, D, n//2+1)
        grad_x = grad_kernel = None
        # Correlations: grad_x[s] = Σ_t g[t] kernel[t − s], grad_kernel[lag] = Σ_b Σ_t g[t] x[t − lag]; the zero
        # padding makes the circular lags t − s < 0 read zeros. grad_kernel first: grad_x overwrites grad_spectrum.
        if ctx.needs_input_grad[1]:
            cross = torch.fft.rfft(x, n=n).conj_physical_().mul_(grad_spectrum).sum(0)  # (D, n//2+1)
            grad_kernel = torch.fft.irfft(cross, n=n)[..., :length]
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(grad_spectrum.mul_(torch.fft.rfft(kernel, n=n).conj()), n=n)[..., :length]
        return grad_x, grad_kernel, None


def causal_fft_convolution(x, kernel, kernel_spectrum=None):
    """y[..., t] = Σ_{lag ≤ t} kernel[..., lag] x[..., t − lag]: x (B, D, L), kernel (D, L) or (1, L) → (B, D, L),
    through FFTs, with the memory-lean backward of `_CausalFFTConvolution` (every backend). kernel_spectrum: the
    kernel's `causal_fft_kernel_spectrum` for L, to skip its transform (it gets no gradient; the kernel does)."""
    return _CausalFFTConvolution.apply(x, kernel, kernel_spectrum)


def causal_fft_convolution_torch(x, kernel, kernel_spectrum=None):
    """`causal_fft_convolution` with autograd through the FFTs: same signature and result."""
    length, n = x.shape[-1], 2 * x.shape[-1]
    if kernel_spectrum is None:
        kernel_spectrum = causal_fft_kernel_spectrum(kernel, length)
    return torch.fft.irfft(torch.fft.rfft(x, n=n) * kernel_spectrum, n=n)[..., :length]


def causal_fft_convolution_ref(x, kernel, kernel_spectrum=None):
    """The definition, a sum over lags in float64: same signature (the kernel defines it; `kernel_spectrum` is not
    read), result in float64."""
    x, kernel = x.double(), kernel.double()
    length = x.shape[-1]
    windows = F.pad(x, (length - 1, 0)).unfold(-1, length, 1)  # (B, D, L, L): window t holds x[t − L + 1 .. t]
    return (windows * kernel.flip(-1)[:, None, :]).sum(-1)  # lag 0 meets x[t]


DIRECT_FILTER_MAX_LENGTH = 256  # the longest input the fused CPU path sums directly instead of through FFTs


def causal_filter_convolution(x, kernel, kernel_spectrum=None, backend=None):
    """The causal filter's convolution on `backend`'s path; same signature and result as
    `causal_fft_convolution_torch` (x (B, D, L), kernel (D, W) or (1, W), lag 0 first → (B, D, L)). For "cpu_fused",
    without gradient and for L ≤ `DIRECT_FILTER_MAX_LENGTH`: the direct sum over the lags of `cpu_scan` (L·W/2
    multiply-adds per channel, in cache, channel-last; at L = 200 about 0.6× the FFTs' time at batch 1 and 0.3×
    at batch 256, level at L = 400, docs/BENCHMARKS.md). Everywhere else `causal_fft_convolution`, whose
    backward the direct loop does not have."""
    if filter_sums_directly(x, kernel, backend):
        return causal_filter_cpu(x, kernel)
    return causal_fft_convolution(x, kernel, kernel_spectrum)


def filter_sums_directly(x, kernel, backend=None) -> bool:
    """Whether `causal_filter_convolution(x, kernel, ..., backend)` takes the direct sum over the lags, which reads no
    kernel spectrum."""
    backend = resolve_backend(x.device) if backend is None else backend
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)
    return backend == "cpu_fused" and not wants_grad and x.shape[-1] <= DIRECT_FILTER_MAX_LENGTH


# ------------------------------------------------------------------ the causal filter's window sum (one cached step)

WINDOW_LAGS_PER_BLOCK = 64  # lags of a step's window summed at once by the twin: 4 MB at B = 256, D = 64 (cache-sized)


def blocked_window_sum(window_ids: torch.Tensor, kernel: torch.Tensor,
                       rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_k kernel[k] ⊙ rows(window_ids[:, k]), `WINDOW_LAGS_PER_BLOCK` lags at a time: window_ids (B, W), kernel
    (W, D) or (W, 1), rows maps ids (B, lags) to vectors (B, lags, D) → (B, D), in float32 (float64 for a float64
    kernel). A whole batch's gathered
    (B, W, D) window, 131 MB at B = 256 and W = 2,000, falls out of cache and was page-faulted in afresh at every
    step, 4.1× slower (docs/BENCHMARKS.md). The blocks are over lags, not users, so that their number is fixed by W
    and an exported step keeps a dynamic batch."""
    dtype = torch.promote_types(kernel.dtype, torch.float32)
    kernel, total = kernel.to(dtype), None
    for start in range(0, window_ids.shape[1], WINDOW_LAGS_PER_BLOCK):
        block = rows(window_ids[:, start:start + WINDOW_LAGS_PER_BLOCK]).to(dtype)  # (B, lags, D)
        block = (block * kernel[start:start + WINDOW_LAGS_PER_BLOCK]).sum(dim=1)  # (B, D)
        total = block if total is None else total + block
    return total


def filter_window_sum_torch(window_ids: torch.Tensor, table: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The causal filter's output at one new event per user, before its residual and norm: out[b] = Σ_k kernel[k] ⊙
    table[window_ids[b, k]]. window_ids (B, W): each user's last W item ids, oldest first; table (I, D): the
    embedded catalogue (row 0, the padding, zero); kernel (W, D) or (W, 1): the filter's kernel, lag W − 1 first
    → (B, D) float32 (float64 for a float64 kernel). Gathers the window block by block (`blocked_window_sum`)."""
    return blocked_window_sum(window_ids, kernel, lambda ids: F.embedding(ids, table))


def filter_window_sum_ref(window_ids, table, kernel):
    """The definition in float64: same signature, result in float64."""
    return (F.embedding(window_ids, table.double()) * kernel.double()).sum(dim=1)


def filter_window_sum(window_ids, table, kernel, backend=None):
    """`filter_window_sum_torch` on `backend`'s path: the fused C++ loop of `cpu_scan` for "cpu_fused" (without
    gradient: the loop has no backward), which reads the ids and sums the table's rows in cache instead of gathering
    the window; the twin on every other backend."""
    backend = resolve_backend(window_ids.device) if backend is None else backend
    wants_grad = torch.is_grad_enabled() and (table.requires_grad or kernel.requires_grad)
    if backend == "cpu_fused" and not wants_grad:
        return filter_window_sum_cpu(window_ids, table, kernel)
    return filter_window_sum_torch(window_ids, table, kernel)


# ------------------------------------------------------------------------------------ full-softmax cross-entropy


def first_occurrences(item_ids: torch.Tensor) -> torch.Tensor:
    """item_ids (B, L) with every repeat of an earlier item in its sequence replaced by 0 (padding), so that each item
    is counted once: position t has seen exactly the nonzero items of `result[:, :t + 1]`. A stable sort per row, so
    its cost does not grow with the catalogue."""
    sorted_items, order = item_ids.sort(dim=1, stable=True)  # equal items stay in position order
    first_in_run = torch.ones_like(sorted_items, dtype=torch.bool)
    first_in_run[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    return torch.where(torch.zeros_like(first_in_run).scatter_(1, order, first_in_run), item_ids, 0)


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `user_states @ item_weights.T` over the whole catalogue, computed in row chunks.

    The plain version materialises (M, I) logits and their softmax for every labelled position (hundreds of MB per
    batch at ML-1M sizes) and is bound by memory traffic. Here each chunk's logits are computed, reduced to their
    log-sum-exp and target logit, and dropped; the backward recomputes them one chunk at a time. Exact: the same
    arithmetic as `F.cross_entropy(..., ignore_index=-100)` on the full logits, in float32. Column 0 (padding) never
    takes probability; rows labelled −100 weigh nothing.
    With `seen_offset`, row m's logits of the items its position has seen (the nonzero `first_items[rows[m], :t + 1]`
    for t = positions[m]) get the learned offset added, and its gradient is returned. With `exclude_seen` those items
    leave the softmax instead, except the row's own target.
    """

    @staticmethod
    def _logits(states, weights, targets, seen_offset, exclude_seen, first_items, rows, positions, start, stop):
        """The logits of rows start:stop, (chunk, I), and the columns of the items each row has seen (chunk, L), 0
        where none (or None without an offset)."""
        logits = states[start:stop] @ weights.t()  # (chunk, I)
        seen_columns = None
        if first_items is not None:
            seen_columns = first_items[rows[start:stop]]  # (chunk, L), each item once
            length = seen_columns.shape[1]
            seen_columns = seen_columns * (torch.arange(length, device=logits.device) <= positions[start:stop, None])
            # Column 0 collects the offset of every unused slot, and is then set to -inf.
            if exclude_seen:
                logits.scatter_(1, _seen_but_not_target(seen_columns, targets[start:stop]), float("-inf"))
            else:
                logits.scatter_add_(1, seen_columns, seen_offset.to(logits.dtype).expand(seen_columns.shape))
        logits[:, 0] = float("-inf")
        return logits, seen_columns if seen_offset is not None else None

    @staticmethod
    def forward(ctx, user_states, item_weights, labels, seen_offset, exclude_seen, first_items, rows, positions):
        dtype = torch.promote_types(user_states.dtype, torch.float32)  # half precision computes in float32
        states, weights = user_states.to(dtype), item_weights.to(dtype)  # (M, D), (I, D)
        num_rows = states.shape[0]
        chunk = max(64, (1 << 20) // weights.shape[0])  # ~4 MB of logits per chunk stays in cache
        labelled = labels != -100  # (M,)
        targets = labels.clamp(min=0)  # an ignored row reads column 0 and is then zeroed
        log_normalizers = states.new_empty(num_rows)  # (M,)
        target_logits = states.new_empty(num_rows)  # (M,)
        for start in range(0, num_rows, chunk):
            stop = start + chunk
            logits, _ = _FullSoftmaxCrossEntropy._logits(states, weights, targets, seen_offset, exclude_seen,
                                                         first_items, rows, positions, start, stop)
            log_normalizers[start:stop] = torch.logsumexp(logits, dim=1)
            target_logits[start:stop] = logits.gather(1, targets[start:stop, None])[:, 0]
        ctx.save_for_backward(user_states, item_weights, targets, labelled, log_normalizers, seen_offset, first_items,
                              rows, positions)
        ctx.chunk, ctx.exclude_seen = chunk, exclude_seen
        return torch.where(labelled, log_normalizers - target_logits, 0.0).sum() / labelled.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (user_states, item_weights, targets, labelled, log_normalizers, seen_offset, first_items, rows,
         positions) = ctx.saved_tensors
        states, weights = user_states.to(log_normalizers.dtype), item_weights.to(log_normalizers.dtype)
        grad_states, grad_weights = torch.empty_like(states), torch.zeros_like(weights)
        grad_offset = None if seen_offset is None else torch.zeros((), dtype=states.dtype, device=states.device)
        row_scales = labelled * (grad_loss.to(states.dtype) / labelled.sum())  # (M,): 0 for ignored rows
        for start in range(0, states.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            # logits → softmax → d loss / d logits, in place
            probabilities, seen_columns = _FullSoftmaxCrossEntropy._logits(
                states, weights, targets, seen_offset, ctx.exclude_seen, first_items, rows, positions, start, stop)
            probabilities.sub_(log_normalizers[start:stop, None]).exp_()
            rows_in_chunk = torch.arange(probabilities.shape[0], device=probabilities.device)
            probabilities[rows_in_chunk, targets[start:stop]] -= 1.0
            probabilities.mul_(row_scales[start:stop, None])
            grad_states[start:stop] = probabilities @ weights
            grad_weights.addmm_(probabilities.t(), states[start:stop])
            if seen_columns is not None:  # column 0's gradient is 0: padding never takes probability
                grad_offset += probabilities.gather(1, seen_columns).sum()
        if grad_offset is not None:
            grad_offset = grad_offset.to(seen_offset.dtype)
        return (grad_states.to(user_states.dtype), grad_weights.to(item_weights.dtype), None, grad_offset, None, None,
                None, None)


def full_softmax_cross_entropy(user_states: torch.Tensor, item_weights: torch.Tensor, labels: torch.Tensor,
                               seen_offset: torch.Tensor | None = None,
                               seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                               exclude_seen: bool = False) -> torch.Tensor:
    """Mean softmax cross-entropy over all items: user_states (M, D), item_weights (I, D), labels (M,) in 1..I−1, or
    −100 for a row without a target. Equals `F.cross_entropy(scores, labels, ignore_index=-100)` with the padding
    column excluded, without storing (M, I) scores.

    seen = (first_items (B, L) from first_occurrences, rows (M,) the sequence of each row, positions (M,) its
    position) names the items each row has already seen. seen_offset: a scalar added to their logits. exclude_seen:
    they leave the softmax instead, except a row's own target (a revisit stays winnable): the history-removed
    protocol, in training.
    """
    if not torch.compiler.is_compiling() and not (labels != -100).any():
        raise ValueError("no labelled position in the batch: every label is -100")
    _check_seen_arguments(seen_offset, seen, exclude_seen)
    first_items, rows, positions = seen if seen is not None else (None, None, None)
    return _FullSoftmaxCrossEntropy.apply(user_states, item_weights, labels, seen_offset, exclude_seen, first_items,
                                          rows, positions)


def _check_seen_arguments(seen_offset, seen, exclude_seen):
    if seen_offset is not None and exclude_seen:
        raise ValueError("exclude_seen leaves the seen items out of the softmax, where an offset on them has no "
                         "effect: pass one or the other")
    if (seen_offset is not None or exclude_seen) != (seen is not None):
        raise ValueError("seen goes with seen_offset or exclude_seen, and only with them")


def _seen_but_not_target(seen_columns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """seen_columns (M, L) with each row's target (M,) replaced by 0 (padding, which never takes probability)."""
    return torch.where(seen_columns == targets[:, None], 0, seen_columns)


def _logits_with_seen_offset(user_states, item_weights, labels, seen_offset, seen, exclude_seen):
    """(M, I) logits with the offset on (or without) each row's seen items and column 0 at -inf, by autograd (the
    twins' part)."""
    logits = user_states @ item_weights.t()
    if seen is not None:
        first_items, rows, positions = seen
        columns = first_items[rows] * (torch.arange(first_items.shape[1], device=rows.device) <= positions[:, None])
        if exclude_seen:
            columns = _seen_but_not_target(columns, labels)
        seen_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, columns, True)
        logits = logits.masked_fill(seen_mask, float("-inf")) if exclude_seen else logits + seen_mask * seen_offset
    padding = torch.arange(logits.shape[1], device=logits.device) == 0
    return logits.masked_fill(padding, float("-inf"))


def full_softmax_cross_entropy_torch(user_states, item_weights, labels, seen_offset=None, seen=None,
                                     exclude_seen=False):
    """`full_softmax_cross_entropy` through the (M, I) logits and `F.cross_entropy`: same signature and result."""
    _check_seen_arguments(seen_offset, seen, exclude_seen)
    dtype = torch.promote_types(user_states.dtype, torch.float32)
    logits = _logits_with_seen_offset(user_states.to(dtype), item_weights.to(dtype), labels, seen_offset, seen,
                                      exclude_seen)
    return F.cross_entropy(logits, labels, ignore_index=-100)


def full_softmax_cross_entropy_ref(user_states, item_weights, labels, seen_offset=None, seen=None, exclude_seen=False):
    """The definition in float64: mean over labelled rows of log-sum-exp minus the target's logit."""
    offset = None if seen_offset is None else seen_offset.double()
    logits = _logits_with_seen_offset(user_states.double(), item_weights.double(), labels, offset, seen, exclude_seen)
    labelled = labels != -100
    target_logits = logits[labelled].gather(1, labels[labelled, None])[:, 0]
    return (logits[labelled].logsumexp(dim=1) - target_logits).mean()


# ------------------------------------------------------------------------------------ sampled softmax


def first_positions(first_items: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Where each of item_ids (B, X), nonzero ids, first occurs in its row of first_items (B, L) (from
    `first_occurrences`, so each item once): (B, X) positions, L where the row never has it. A binary search per row:
    no (B, I) table, whatever the catalogue size."""
    length = first_items.shape[1]
    sorted_items, order = first_items.sort(dim=1)  # (B, L)
    index = torch.searchsorted(sorted_items, item_ids).clamp_(max=length - 1)  # (B, X)
    found = sorted_items.gather(1, index) == item_ids
    return torch.where(found, order.gather(1, index), length)


def _count_in(item_ids: torch.Tensor, population: torch.Tensor) -> torch.Tensor:
    """How often each of item_ids (K,) occurs in population (M,): (K,)."""
    values, counts = population.unique(return_counts=True)  # sorted
    index = torch.searchsorted(values, item_ids).clamp_(max=len(values) - 1)
    return torch.where(values[index] == item_ids, counts[index], 0)


def draw_negatives(sampler: str, num_negatives: int, labels: torch.Tensor, num_items: int,
                   item_counts: torch.Tensor | None = None,
                   num_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The negatives a batch's sampled softmax shares: (K,) item ids in 1..num_items, and (K,) the log of each one's
    expected count among the draws (the logQ correction, so that Σ exp(logit − log expected count) over the draws is
    an unbiased estimate of Σ exp(logit) over the items the sampler can draw). With `num_groups` G ("uniform" and
    "popularity" only): G independent draws, one per group of targets (a sequence), (G, K) each.

    sampler:
        "uniform"     K ids drawn uniformly from 1..num_items, with replacement: expected count K / num_items.
        "popularity"  K ids drawn with probability q(i) ∝ item_counts[i] + 1 (add-one, so that items unseen in
                      training can still be drawn), with replacement: expected count K·q(i).
        "in_batch"    K of the batch's M labelled targets, drawn without replacement (all of them when M ≤ K):
                      expected count min(K, M)·c(i)/M, c(i) the batch's targets equal to i. Popular items come as
                      often as they are targets; items that no row of the batch targets are never negatives.
        "mixed"       K // 2 in-batch and the rest uniform (Mixed Negative Sampling, Yi et al. 2020): expected count
                      the sum of both, so the correction holds for the pooled draws.
    labels: (M,) the batch's targets, −100 for a row without one. item_counts: (I,) each item's training count
    (row 0, padding, is ignored); "popularity" only.
    """
    device = labels.device
    shape = (num_negatives,) if num_groups is None else (num_groups, num_negatives)
    if num_groups is not None and sampler not in ("uniform", "popularity"):
        raise ValueError(f"negative_sampler={sampler!r} draws from the whole batch's targets, not per group: "
                         f"per-sequence negatives take 'uniform' or 'popularity'")
    if sampler == "popularity":
        if item_counts is None:
            raise ValueError("negative_sampler='popularity' needs each item's training count: call "
                             "model.set_item_counts(counts) before computing the loss (m2rec-train does)")
        if item_counts.shape != (num_items + 1,):
            raise ValueError(f"item_counts has shape {tuple(item_counts.shape)}, the catalogue needs "
                             f"({num_items + 1},) (row 0 for padding): set the counts again after resizing it")
        weights = item_counts[1:].to(device, torch.float64) + 1.0  # (num_items,)
        negatives = torch.multinomial(weights, math.prod(shape), replacement=True).view(shape) + 1
        return negatives, (num_negatives * weights[negatives - 1] / weights.sum()).log().float()
    if sampler == "uniform":
        negatives = torch.randint(1, num_items + 1, shape, device=device)
        return negatives, torch.full(shape, math.log(num_negatives / num_items), device=device)
    if sampler not in ("in_batch", "mixed"):
        raise ValueError(f"negative_sampler={sampler!r} is not supported; choose one of "
                         f"('uniform', 'popularity', 'in_batch', 'mixed')")
    targets = labels[labels != -100]  # (M,)
    if len(targets) == 0:
        raise ValueError("no labelled position in the batch: every label is -100")
    from_batch = num_negatives if sampler == "in_batch" else num_negatives // 2
    taken = min(from_batch, len(targets))
    negatives = targets[torch.randperm(len(targets), device=device)[:taken]]
    uniform = num_negatives - from_batch  # 0 for "in_batch"
    negatives = torch.cat([negatives, torch.randint(1, num_items + 1, (uniform,), device=device)])
    expected = taken * _count_in(negatives, targets).double() / len(targets) + uniform / num_items
    return negatives, expected.log().float()


def sampled_softmax_cross_entropy(user_states: torch.Tensor, item_weights: torch.Tensor, labels: torch.Tensor,
                                  negatives: torch.Tensor, log_expected_counts: torch.Tensor,
                                  seen_offset: torch.Tensor | None = None,
                                  seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                                  sequences: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy with logQ correction: for each row, the softmax over its target and the
    K negatives of its draw, each negative's logit lowered by the log of its expected count
    (`draw_negatives`). A negative equal to the row's target (an accidental hit) is left out, so the corrected sum
    over the negatives estimates the normaliser's other items without bias, and with every item once as a negative
    (negatives = 1..I−1, log_expected_counts 0) this is exactly `full_softmax_cross_entropy`.

    user_states (M, D), item_weights (I, D), labels (M,) in 1..I−1 or −100; negatives and log_expected_counts (K,),
    shared by every row, or (G, K), one draw per sequence, with `sequences` = (each row's sequence (M,), its slot in
    the sequence (M,), the number of slots S): the logits are then one (G, S, D) × (G, D, K) batched product, so
    that no (M, K, D) tensor of gathered vectors exists. seen_offset and seen as in `full_softmax_cross_entropy`.
    Costs (M, K) logits instead of (M, I). Computed in float32 (or wider).
    """
    if not torch.compiler.is_compiling() and not (labels != -100).any():
        raise ValueError("no labelled position in the batch: every label is -100")
    if (seen_offset is None) != (seen is None):
        raise ValueError("seen_offset and seen go together")
    if (negatives.dim() == 2) != (sequences is not None):
        raise ValueError("per-sequence negatives (G, K) need `sequences`, shared ones (K,) do not take it")
    dtype = torch.promote_types(user_states.dtype, torch.float32)
    states = user_states.to(dtype)  # (M, D)
    targets = labels.clamp(min=0)  # an ignored row reads padding and is then given no weight
    # One gather for both: its backward scatters into one dense (I, D) gradient, not two (256 MB each at 10^6 items).
    gathered = item_weights[torch.cat([targets, negatives.flatten()])].to(dtype)  # (M + G·K, D)
    target_logits = (states * gathered[:len(targets)]).sum(dim=1)  # (M,)
    negative_vectors = gathered[len(targets):]  # (K, D), or (G·K, D)
    if sequences is None:
        negative_logits = states @ negative_vectors.t()  # (M, K)
        row_negatives, row_log_counts = negatives[None, :], log_expected_counts[None, :]
    else:
        rows, slots, num_slots = sequences
        groups, num_negatives = negatives.shape
        by_sequence = states.new_zeros(groups, num_slots, states.shape[1]).index_put((rows, slots), states)
        negative_logits = torch.bmm(by_sequence, negative_vectors.view(groups, num_negatives, -1).transpose(1, 2))
        negative_logits = negative_logits[rows, slots]  # (G, S, K) → (M, K)
        row_negatives, row_log_counts = negatives[rows], log_expected_counts[rows]  # (M, K)
    negative_logits = negative_logits - row_log_counts.to(dtype)
    if seen_offset is not None:
        first_items, rows, positions = seen
        shared = negatives.repeat(len(first_items), 1) if negatives.dim() == 1 else negatives  # (B, K)
        negatives_seen = first_positions(first_items, shared)[rows] <= positions[:, None]  # (M, K)
        target_seen = first_positions(first_items[rows], targets[:, None])[:, 0] <= positions  # (M,)
        negative_logits = negative_logits + negatives_seen * seen_offset.to(dtype)
        target_logits = target_logits + target_seen * seen_offset.to(dtype)
    negative_logits = negative_logits.masked_fill(row_negatives == targets[:, None], float("-inf"))
    log_normalizers = torch.cat([target_logits[:, None], negative_logits], dim=1).logsumexp(dim=1)  # (M,)
    labelled = labels != -100
    return torch.where(labelled, log_normalizers - target_logits, 0.0).sum() / labelled.sum()


# ------------------------------------------------------------------------------------ top-k over a large catalogue


def bf16_scoring_supported(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native on `device` (a CPU with AVX512-BF16 or AMX, a CUDA GPU with
    bfloat16), so that scoring in bfloat16 is faster than in float32 rather than emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # private helpers of torch.cpu (torch >= 2.3); absent, assume no native bfloat16
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def bf16_score_error_bound(hidden_size: int) -> float:
    """c such that |score in bfloat16 − score in float32| ≤ c·‖u‖·‖v‖ for a dot product of width D: both operands
    rounded to bfloat16 (unit roundoff 2⁻⁸ each), the sum in float32 (D·2⁻²⁴), the result rounded to bfloat16
    (2⁻⁸), doubled for safety (a backend that sums in blocks)."""
    return 2 * (3 * 2.0 ** -8 + hidden_size * 2.0 ** -23)


def _adjust_chunk(scores, start, offset_items, offset_values, excluded_items):
    """Adds the offsets and lowers the excluded items on scores (B, C) of items start..start + C − 1, in place."""
    stop = start + scores.shape[1]
    if offset_items is not None:
        inside = (offset_items >= start) & (offset_items < stop) & (offset_items != 0)  # (B, X)
        columns = (offset_items - start).clamp(0, scores.shape[1] - 1)
        scores.scatter_add_(1, columns, torch.where(inside, offset_values.to(scores.dtype), 0.0))
    if excluded_items is not None:
        inside = (excluded_items >= start) & (excluded_items < stop)  # (B, E)
        columns = (excluded_items - start).clamp(0, scores.shape[1] - 1)
        hits = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, columns, inside.int())  # repeats count
        scores.masked_fill_(hits > 0, torch.finfo(scores.dtype).min)
    if start == 0:
        scores[:, 0] = float("-inf")  # padding, below every excluded item


def top_k_items(user_states: torch.Tensor, item_weights: torch.Tensor, k: int, chunk_size: int = 65536,
                bf16: bool = False, offset_items: torch.Tensor | None = None,
                offset_values: torch.Tensor | None = None,
                excluded_items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items for each user, best first, scored `chunk_size` items at a time with a running top k merged
    after each chunk, so that memory is O(B·chunk_size) whatever the catalogue size I.

    user_states (B, D), item_weights (I, D) (row 0 padding, never returned). Scores are float32 dot products,
    plus offset_values (B, X) on offset_items (B, X) (0 padding; each item once, as from `first_occurrences`),
    with excluded_items (B, E) (0 padding) at float32's lowest value (after every other item) and padding at −inf.
    With `bf16`, each chunk is first scored in bfloat16 (`bf16_scoring_supported`) and only the items that the
    error bound (`bf16_score_error_bound`) cannot rule out of the top k are scored again in float32: the result is
    the float32 ranking, exactly, up to ties. Returns `(scores, item_ids)`, both (B, k).
    """
    batch, hidden = user_states.shape
    states = user_states.float()  # (B, D)
    best_scores = states.new_full((batch, 0), float("-inf"))
    best_items = torch.zeros(batch, 0, dtype=torch.long, device=states.device)
    if bf16:
        states_bf16 = states.to(torch.bfloat16)
        margins = bf16_score_error_bound(hidden) * states.norm(dim=1, keepdim=True)  # (B, 1)
    for start in range(0, item_weights.shape[0], chunk_size):
        weights = item_weights[start:start + chunk_size].float()  # (C, D)
        if bf16:
            approximate = (states_bf16 @ weights.to(torch.bfloat16).t()).float()  # (B, C)
            _adjust_chunk(approximate, start, offset_items, offset_values, excluded_items)
            # the product's error, and the rounding of the offset's addition
            error = margins * weights.norm(dim=1) + approximate.abs() * 2.0 ** -20  # (B, C)
            # The k-th best float32 score of this chunk and the running top k together is at least `threshold`: an
            # item whose score cannot reach it is out, and only the others are scored again in float32.
            chunk_kth = (approximate - error).topk(min(k, approximate.shape[1]), dim=1).values[:, -1:]  # (B, 1)
            threshold = torch.maximum(best_scores[:, -1:], chunk_kth) if best_scores.shape[1] == k else chunk_kth
            candidates = approximate + error >= threshold  # (B, C)
            rows, columns = candidates.nonzero(as_tuple=True)
            if len(rows) * hidden <= candidates.numel():
                scores = torch.full_like(approximate, float("-inf"))
                scores[rows, columns] = (states[rows] * weights[columns]).sum(dim=1)
            else:  # too many to gather within the chunk's memory (near-ties everywhere): the whole chunk
                scores = states @ weights.t()
            _adjust_chunk(scores, start, offset_items, offset_values, excluded_items)
            scores.masked_fill_(~candidates, float("-inf"))
        else:
            scores = states @ weights.t()  # (B, C)
            _adjust_chunk(scores, start, offset_items, offset_values, excluded_items)
        chunk_scores, chunk_columns = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)  # (B, ≤ 2k)
        merged_items = torch.cat([best_items, chunk_columns + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_items = merged_items.gather(1, order)
    return best_scores, best_items


def top_k_items_torch(user_states, item_weights, k, chunk_size=65536, bf16=False, offset_items=None,
                      offset_values=None, excluded_items=None):
    """`top_k_items` through the full (B, I) float32 scores and one `topk`: same signature and result (up to ties);
    chunk_size and bf16 are ignored."""
    scores = user_states.float() @ item_weights.float().t()  # (B, I)
    _adjust_chunk(scores, 0, offset_items, offset_values, excluded_items)
    return scores.topk(k, dim=1)
