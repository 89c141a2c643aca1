"""The AFFM mixer's training step on the fused CPU kernels, keeping only the mixer's inputs for the backward.

`M2RecMixer.forward` is the plain composition: projections, `causal_conv1d`, `selective_scan`, out_proj, each
differentiated by autograd, which then keeps seven (B, L, Di) tensors per layer (both convolutions' inputs, the
scan's u, Δ and z, x_proj's input and out_proj's). `MixerCPUFn` computes the same function and gradients, the way
mamba-ssm's `mamba_inner_fn` does on GPU: its forward keeps the two (B, L, d) inputs (which the layers around it
keep anyway) and the small (B, L, R + 2N) output of x_proj, and its backward recomputes the rest, one stage at a
time, each freed once used:

    1. the scan path: z, the convolved x and Δ, then the scan's backward, which also returns the scan's output
       (for out_proj's weight gradient) and writes its gradients over the recomputed inputs;
    2. the selection path: the second convolution and x_proj's input.

The scan's forward is never run twice; the recomputation costs three (B·L, d) × (d, Di) products, two
convolutions and Δ's rank-R product. Shapes: B batch, L length, d hidden size, Di mixer size (expand · d),
N state size, R Δ's rank.
"""

import torch
import torch.nn.functional as F

from .cpu_scan import fused_backward, kernel_ops, traced_or_direct, vector_width


def _channels_first(t):
    """(B, L, C) → the (B, C, L) view the kernels take (mamba-ssm's layout), without a copy."""
    return t.transpose(1, 2)


def _flat(t):
    """(B, L, C) → (B·L, C)."""
    return t.reshape(-1, t.shape[-1])


def _split_projection(projected, rank):
    """x_proj's output (B, L, R + 2N) → Δ's rank-R input, B and C, (B, L, ·) views."""
    state_size = (projected.shape[-1] - rank) // 2
    return projected.split([rank, state_size, state_size], dim=-1)


def _convolve(pre_activation, conv_kernel, conv_bias):
    """SiLU(causal depthwise conv), (B, L, Di) → (B, L, Di)."""
    convolve = traced_or_direct("conv_fwd")
    return _channels_first(convolve(_channels_first(pre_activation), conv_kernel, conv_bias, True))


def mixer_forward(hidden_states, selection_states, in_proj, conv_weight, conv_bias, x_proj, dt_proj, dt_bias, A_log,
                  D, out_proj, output_positions=None):
    """The mixer's output on the fused CPU kernels, without autograd: (B, L, d) → out (B, L, d), or (B, 1, d) at
    `output_positions` (B,), one position per sequence (the scan reads every position; the gate and out_proj run at
    those only); and x_proj's output (B, L, R + 2N), which `MixerCPUFn`'s backward keeps. Arguments as
    `MixerCPUFn`'s. `MixerCPUFn.forward`, and the mixer's inference: a batch-1 call spent more time calling the
    mixer's submodules and kernel wrappers one by one than in their arithmetic."""
    conv_kernel, x_weight = conv_weight[:, 0], in_proj[:conv_weight.shape[0]]  # (Di, K), (Di, d)
    if selection_states is hidden_states:
        x = selection = _convolve(F.linear(hidden_states, x_weight), conv_kernel, conv_bias)  # (B, L, Di)
    else:
        # Both streams through one product and one convolution, stacked on the batch: at batch 1 a second call
        # of each cost more than the copy (a whole recommendation 3.7 % faster, the same values to the bit).
        both = torch.cat([hidden_states, selection_states])  # (2B, L, d)
        convolved = _convolve(F.linear(both, x_weight), conv_kernel, conv_bias)  # (2B, L, Di)
        # slices, not split(B): exporting with a dynamic batch fails on the guard split's chunk count needs
        x, selection = convolved[:hidden_states.shape[0]], convolved[hidden_states.shape[0]:]
    projected = F.linear(selection, x_proj)  # (B, L, R + 2N): Δ's rank-R input, B, C
    del selection
    dt_rank, B, C = _split_projection(projected, dt_proj.shape[1])
    # (B, L, Di), the raw step (bias and softplus run in the kernel). F.linear, not dt_rank @ dt_proj.t(): a whole
    # batch-1 recommendation measured 8 % faster with it (interleaved, this product the only change).
    dt = F.linear(dt_rank, dt_proj)
    z_weight = in_proj[conv_weight.shape[0]:]  # (Di, d)
    if output_positions is None:
        z = F.linear(selection_states, z_weight)
    else:
        # shape[0], not len(): torch.export keeps a dynamic batch symbolic only through the shape
        rows = torch.arange(output_positions.shape[0], device=output_positions.device)
        z = F.linear(selection_states[rows, output_positions], z_weight)  # (B, Di)
    y, _ = traced_or_direct("scan_fwd")(_channels_first(x), _channels_first(dt), -torch.exp(A_log),
                                        _channels_first(B), _channels_first(C), D,
                                        _channels_first(z) if output_positions is None else None,
                                        dt_bias, None, True, vector_width())  # (B, Di, L)
    del x, dt
    if output_positions is None:
        return F.linear(_channels_first(y), out_proj), projected  # (B, L, d)
    gated = y[rows, :, output_positions] * F.silu(z)  # (B, Di)
    return F.linear(gated, out_proj).unsqueeze(1), projected  # (B, 1, d)


class MixerCPUFn(torch.autograd.Function):
    """out = M2RecMixer(hidden_states, selection_states) for float32 CPU tensors; see the module docstring.

    Args: hidden_states, selection_states (B, L, d); the mixer's parameters: in_proj (2·Di, d), conv (Di, 1, K)
    and its bias (Di,), x_proj (R + 2N, Di), dt_proj (Di, R) and its bias (Di,), A_log (Di, N), D (Di,),
    out_proj (d, Di). Returns out (B, L, d).
    """

    @staticmethod
    def forward(ctx, hidden_states, selection_states, in_proj, conv_weight, conv_bias, x_proj, dt_proj, dt_bias,
                A_log, D, out_proj):
        out, projected = mixer_forward(hidden_states, selection_states, in_proj, conv_weight, conv_bias, x_proj,
                                       dt_proj, dt_bias, A_log, D, out_proj)
        ctx.save_for_backward(hidden_states, selection_states, projected, in_proj, conv_weight, conv_bias, x_proj,
                              dt_proj, dt_bias, A_log, D, out_proj)
        ctx.width = vector_width()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (hidden_states, selection_states, projected, in_proj, conv_weight, conv_bias, x_proj, dt_proj, dt_bias,
         A_log, D, out_proj) = ctx.saved_tensors
        conv_kernel = conv_weight.squeeze(1)  # (Di, K)
        x_weight, z_weight = in_proj.chunk(2, dim=0)
        dt_rank, B, C = _split_projection(projected, dt_proj.shape[1])
        grad_out = grad_out.contiguous()
        A = -torch.exp(A_log)

        # 1. The scan path. bwd writes du, dΔ, dz and y over x, dt, z and grad_y, which are ours.
        grad_y = grad_out @ out_proj  # (B, L, Di)
        x_pre = F.linear(hidden_states, x_weight)
        x = _convolve(x_pre, conv_kernel, conv_bias)
        dt = F.linear(dt_rank, dt_proj)  # as in mixer_forward
        z = F.linear(selection_states, z_weight)
        grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, grad_z, grad_dt_bias, y, _ = fused_backward(
            *(_channels_first(t) for t in (grad_y, x, dt)), A, _channels_first(B), _channels_first(C), D,
            _channels_first(z), dt_bias, True, ctx.width, return_out=True, reuse_inputs=True)
        del grad_y, x, dt, z
        grad_out_proj = _flat(grad_out).t() @ _flat(_channels_first(y))
        del y
        grad_x, grad_dt, grad_z = (_channels_first(t) for t in (grad_x, grad_dt, grad_z))  # (B, L, Di)
        # (R, B·L) · (B·L, Di), then transposed: the (Di, B·L) · (B·L, R) product is several times slower
        grad_dt_proj = (_flat(dt_rank).t() @ _flat(grad_dt)).t()
        grad_dt_rank = grad_dt @ dt_proj  # (B, L, R)
        del grad_dt
        grad_z_weight = _flat(grad_z).t() @ _flat(selection_states)
        grad_selection_states = grad_z @ z_weight
        del grad_z
        grad_x_pre, grad_conv_weight, grad_conv_bias = kernel_ops.conv_bwd(
            _channels_first(grad_x), _channels_first(x_pre), conv_kernel, conv_bias, True)
        del grad_x, x_pre
        grad_x_pre = _channels_first(grad_x_pre)  # (B, L, Di)
        grad_x_weight = _flat(grad_x_pre).t() @ _flat(hidden_states)
        grad_hidden_states = grad_x_pre @ x_weight
        del grad_x_pre

        # 2. The selection path: x_proj's input, recomputed, and both of its products.
        selection_pre = F.linear(selection_states, x_weight)
        selection = _convolve(selection_pre, conv_kernel, conv_bias)
        grad_projected = torch.cat([grad_dt_rank, _channels_first(grad_B), _channels_first(grad_C)], dim=-1)
        grad_x_proj = _flat(grad_projected).t() @ _flat(selection)
        del selection
        grad_selection = grad_projected @ x_proj  # (B, L, Di)
        grad_selection_pre, grad_conv_weight_2, grad_conv_bias_2 = kernel_ops.conv_bwd(
            _channels_first(grad_selection), _channels_first(selection_pre), conv_kernel, conv_bias, True)
        del grad_selection, selection_pre
        grad_selection_pre = _channels_first(grad_selection_pre)
        grad_x_weight += _flat(grad_selection_pre).t() @ _flat(selection_states)
        grad_selection_states += grad_selection_pre @ x_weight

        return (grad_hidden_states, grad_selection_states, torch.cat([grad_x_weight, grad_z_weight]),
                (grad_conv_weight + grad_conv_weight_2).unsqueeze(1), grad_conv_bias + grad_conv_bias_2,
                grad_x_proj, grad_dt_proj, grad_dt_bias, grad_A * A, grad_D, grad_out_proj)

