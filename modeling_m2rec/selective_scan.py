"""Mamba's two kernels, the selective scan and the causal depthwise convolution, for every device.

Each has a plain-PyTorch twin with the same signature and one dispatcher that picks the fastest
available path:

    selective_scan:  CUDA + mamba-ssm  -> mamba_ssm's `selective_scan_fn`
                     CPU + a compiler  -> the fused C++ loop of `cpu_scan`
                     otherwise         -> `selective_scan_torch` (exact, chunked, any device)
    causal_conv1d:   CUDA + causal-conv1d -> `causal_conv1d_fn`; otherwise `causal_conv1d_torch`

`selective_scan_ref`, a loop over time steps, is the definition the others are tested against.
Falling back to a slower path is logged once. M2REC_DISABLE_FUSED_CPU=1 turns the fused CPU path
off (to debug or benchmark the PyTorch one).

Shapes: B batch, D channels (d_inner), L length, N state size. Conventions of mamba-ssm:
u, delta, z (B, D, L); A (D, N), real; B, C (B, N, L), input-dependent; D, delta_bias (D,).
"""

import logging
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cpu_scan import load_cpu_scan, selective_scan_cpu


try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # optional CUDA kernel: absent, or built for another torch/CUDA
    selective_scan_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except Exception:  # optional CUDA kernel
    causal_conv1d_fn = None


logger = logging.getLogger(__name__)
_logged = set()


def _log_once(message):
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan as its definition, one time step at a time (the reference for tests).

        delta <- softplus(delta + delta_bias)          (each step optional)
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,   h_{-1} = 0      h: (B, D, N)
        y_t = C_t . h_t + D u_t;   out_t = y_t * silu(z_t)

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, N, L). D, delta_bias: (D,) or None.
        z: (B, D, L) or None. delta_softplus: apply softplus to delta (after the bias).
    Returns:
        out (B, D, L) in u's dtype; with `return_last_state`, the tuple (out, h_{L-1} (B, D, N)).
    """
    dtype_in = u.dtype
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def _chunk_length(batch, dim, state):
    """Steps per chunk of the PyTorch scan: a power of two in [8, 64], as long as a chunk's
    (B, D, T, N) tensors stay under ~2^23 elements; longer chunks save Python overhead, shorter
    ones memory and the log2(T) passes of the scan."""
    length = 64
    while length > 8 and batch * dim * state * length > 2**23:
        length //= 2
    return length


def _scan_chunk(h0, u, delta, A, B, C):
    """Scan of one chunk of T steps from the state h0.

    Args: h0 (B, D, N); u, delta (B, D, T); A (D, N); B, C (B, N, T).
    Returns: y (B, D, T) without the D u term, and the last state (B, D, N).

    A Hillis-Steele scan of the pairs (decay, input) under (a1, b1) then (a2, b2) = (a1 a2,
    a2 b1 + b2): log2(T) passes, each a few elementwise ops over (B, D, T, N). Decays are in
    [0, 1] whenever delta A <= 0, so their products can only underflow to 0, never overflow.
    """
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (B, D, T, N)
    state = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (B, D, T, N)
    # Folding the carried state into the first input makes the scan yield h_t itself.
    state[:, :, 0] += decay[:, :, 0] * h0
    length = u.shape[-1]
    offset = 1
    while offset < length:
        state = torch.cat(
            [state[:, :, :offset], decay[:, :, offset:] * state[:, :, :-offset] + state[:, :, offset:]],
            dim=2,
        )
        if 2 * offset < length:  # the last pass needs no decay products
            decay = torch.cat([decay[:, :, :offset], decay[:, :, offset:] * decay[:, :, :-offset]], dim=2)
        offset *= 2
    y = torch.einsum("bdtn,bnt->bdt", state, C)
    return y, state[:, :, -1]


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan in plain PyTorch, exact and for any device; same signature and result
    as `selective_scan_ref`.

    The sequence is cut into chunks of T steps (see `_chunk_length`) scanned in parallel
    (`_scan_chunk`); a Python loop carries the (B, D, N) state from chunk to chunk. When
    gradients are needed each chunk is checkpointed: autograd keeps only the chunk inputs and
    states, and the backward recomputes one chunk's (B, D, T, N) tensors at a time, so memory is
    O(B D L + B D N L/T) instead of O(B D L N).
    """
    dtype_in = u.dtype
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    chunk = _chunk_length(batch, dim, A.shape[1])
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    h = u.new_zeros(batch, dim, A.shape[1])  # (B, D, N)
    ys = []
    for start in range(0, length, chunk):
        steps = slice(start, start + chunk)
        args = (h, u[:, :, steps], delta[:, :, steps], A, B[:, :, steps], C[:, :, steps])
        if recompute:
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_backend(device):
    """Which path `selective_scan` takes for tensors on `device`: "cuda" (mamba-ssm),
    "cpu_fused" (the compiled loop of `cpu_scan`) or "torch" (`selective_scan_torch`)."""
    device = torch.device(device)
    if device.type == "cuda":
        if selective_scan_fn is not None:
            return "cuda"
        _log_once("mamba-ssm is not installed: the selective scan runs in plain PyTorch on CUDA")
        return "torch"
    if device.type == "cpu":
        if os.environ.get("M2REC_DISABLE_FUSED_CPU", "0") not in ("", "0"):
            _log_once("M2REC_DISABLE_FUSED_CPU is set: the selective scan runs in plain PyTorch")
            return "torch"
        if load_cpu_scan() is not None:
            return "cpu_fused"
        _log_once("fused CPU selective scan unavailable: the selective scan runs in plain PyTorch")
        return "torch"
    return "torch"


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan on the fastest available path (see `selective_scan_backend`); same
    signature and result as `selective_scan_ref`.

    Args:
        u, delta: (B, D, L). A: (D, N). B, C: (B, N, L). D, delta_bias: (D,) or None.
        z: (B, D, L) or None. delta_softplus: apply softplus to delta + delta_bias.
    Returns:
        out (B, D, L); with `return_last_state`, the tuple (out, last state (B, D, N)).
    """
    scan = {
        "cuda": selective_scan_fn,
        "cpu_fused": selective_scan_cpu,
        "torch": selective_scan_torch,
    }[selective_scan_backend(u.device)]
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
        return_last_state=return_last_state,
    )


def causal_conv1d_torch(x, weight, bias=None, activation=None):
    """Causal depthwise convolution: out[:, d, t] = sum_k weight[d, k] x[:, d, t - W + 1 + k].

    Args: x (B, D, L); weight (D, W); bias (D,) or None; activation None, "silu" or "swish".
    Returns: (B, D, L).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    dim, width = weight.shape
    # Padding W - 1 on both sides and keeping the first L outputs sees only the past.
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return F.silu(out) if activation is not None else out


def causal_conv1d(x, weight, bias=None, activation=None):
    """Causal depthwise convolution on the fastest available path; same signature and result as
    `causal_conv1d_torch`: x (B, D, L), weight (D, W), bias (D,) -> (B, D, L)."""
    if x.is_cuda:
        if causal_conv1d_fn is not None:
            return causal_conv1d_fn(x, weight, bias, activation=activation)
        _log_once("causal-conv1d is not installed: the convolution runs in plain PyTorch on CUDA")
    return causal_conv1d_torch(x, weight, bias, activation=activation)


__all__ = [
    "causal_conv1d",
    "causal_conv1d_torch",
    "selective_scan",
    "selective_scan_backend",
    "selective_scan_ref",
    "selective_scan_torch",
]
