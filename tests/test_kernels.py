"""The kernels of `modeling_m2rec.kernels` and `modeling_m2rec.cpu_scan` against the step-by-step
reference in float64: outputs, last states and the gradients of every input.

The fused CPU extension must build here (a compiler exists on every development and CI machine), so
its tests fail rather than skip when it does not; the fallback for machines without a compiler is
tested by making the build fail on purpose. GPU parity tests run only where CUDA is available.
"""

import logging
import os
import time

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from m2rec import cpu_scan, kernels

# Max-norm relative error of a float32 implementation against the float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-11}


def make_inputs(batch, dim, length, state, *, use_D, use_z, use_bias, softplus):
    """Float64 inputs of realistic size: delta is softplus(randn) (or randn that the scan puts
    through softplus itself), A = -exp(randn), the rest randn. Every value is a float32, so that
    float32 runs see exactly the reference's inputs and only their arithmetic is compared."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    delta = randn(batch, dim, length)
    inputs = {
        "u": randn(batch, dim, length),
        "delta": delta if softplus else torch.nn.functional.softplus(delta),
        "A": -torch.exp(randn(dim, state)),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": randn(dim) if use_D else None,
        "z": randn(batch, dim, length) if use_z else None,
        "delta_bias": 0.5 * randn(dim) if use_bias else None,
    }
    return {k: None if v is None else v.float().double() for k, v in inputs.items()}


def run_with_grads(scan, inputs, softplus, dtype):
    """out, last state and the gradients of every given input under a fixed random cotangent,
    all in `dtype`."""
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    out, last_state = scan(**leaves, delta_softplus=softplus, return_last_state=True)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    (out * cotangent).sum().backward()
    grads = {f"d{k}": v.grad for k, v in leaves.items() if v is not None}
    return {"out": out.detach(), "last_state": last_state.detach(), **grads}


def assert_close_to_reference(results, reference, dtype):
    assert results.keys() == reference.keys()
    for name, expected in reference.items():
        actual = results[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == dtype, name
        error = (actual.double() - expected).abs().max().item()
        scale = expected.abs().max().item()
        assert error <= TOLERANCE[dtype] * scale, f"{name}: max error {error:.3g} vs max |ref| {scale:.3g}"


# (batch, dim, length, state, use_D, use_z, use_bias, softplus): L = 1, L not a multiple of any
# chunk, several chunks, N not a multiple of the fused kernel's 16 lanes, N = 1.
CASES = [
    (2, 3, 1, 4, True, True, True, True),
    (2, 5, 37, 8, True, True, True, True),
    (1, 4, 130, 16, False, False, False, False),
    (3, 6, 64, 5, True, False, True, False),
    (4, 7, 71, 33, False, True, False, True),
    (2, 16, 9, 1, True, True, False, False),
    (2, 37, 150, 32, True, True, True, True),  # three 16-channel blocks, the last one partial; three time tiles
]


def fused_scan_variant(name):
    """The fused CPU scan run as its `name` variant at most (see cpu_scan.VECTOR_WIDTHS): the AVX2 one on an AVX-512
    CPU, or the generic loops that CPUs without AVX2 run."""
    def scan(*args, **kwargs):
        with cpu_scan.vector_isa(name):
            return cpu_scan.selective_scan_cpu(*args, **kwargs)

    return scan


IMPLEMENTATIONS = {"torch": kernels.selective_scan_torch, "fused_cpu": cpu_scan.selective_scan_cpu,
                   "fused_cpu_avx2": fused_scan_variant("avx2"), "fused_cpu_generic": fused_scan_variant("none")}


def test_fused_cpu_extension_builds():
    assert cpu_scan.load_cpu_scan() is not None, "the fused CPU scan must build where a compiler exists"


def case_inputs(case):
    """(inputs, softplus) of one of CASES."""
    batch, dim, length, state, use_D, use_z, use_bias, softplus = case
    inputs = make_inputs(batch, dim, length, state, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus)
    return inputs, softplus


every_dtype = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
every_implementation = pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
every_case = pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-D{}-L{}-N{}-D{:d}z{:d}bias{:d}sp{:d}".format(*c))


@every_dtype
@every_implementation
@every_case
def test_scan_matches_reference(case, implementation, dtype):
    inputs, softplus = case_inputs(case)
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    results = run_with_grads(IMPLEMENTATIONS[implementation], inputs, softplus, dtype)
    assert_close_to_reference(results, reference, dtype)


@pytest.mark.parametrize("chunk", [1, 16, 64])
@every_case
def test_fused_cpu_backward_in_time_chunks_matches_reference(monkeypatch, vectorised_scan_variant, case, chunk):
    """The vectorised (AVX-512, AVX2) backward cut into time chunks (the state entering each from a first pass; dL/dh,
    dA, dD and the bias gradient carried across them) against the float64 step loop."""
    monkeypatch.setattr(cpu_scan, "BACKWARD_CHUNK", chunk)
    inputs, softplus = case_inputs(case)
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    results = run_with_grads(cpu_scan.selective_scan_cpu, inputs, softplus, torch.float32)
    assert_close_to_reference(results, reference, torch.float32)


@every_dtype
@every_implementation
@every_case
def test_scan_inference_matches_reference(case, implementation, dtype):
    """Without autograd the kernels run directly, outside their autograd Functions."""
    inputs, softplus = case_inputs(case)
    expected = kernels.selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    with torch.no_grad():
        actual = IMPLEMENTATIONS[implementation](
            **{k: None if v is None else v.to(dtype) for k, v in inputs.items()},
            delta_softplus=softplus, return_last_state=True)
    assert_close_to_reference(dict(zip(["out", "last_state"], actual)), dict(zip(["out", "last_state"], expected)),
                              dtype)


def with_initial_state(inputs):
    """The inputs with a random (B, D, N) state to start from, float32-representable like the rest."""
    batch, dim, state = inputs["u"].shape[0], *inputs["A"].shape
    h0 = torch.randn(batch, dim, state, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return {**inputs, "initial_state": h0.float().double()}


@every_dtype
@every_implementation
@every_case
def test_scan_from_an_initial_state_matches_reference(case, implementation, dtype):
    """A scan continues a given state; the state receives its gradient on every path."""
    inputs, softplus = case_inputs(case)
    inputs = with_initial_state(inputs)
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    results = run_with_grads(IMPLEMENTATIONS[implementation], inputs, softplus, dtype)
    assert_close_to_reference(results, reference, dtype)


@every_case
def test_fused_cpu_backward_in_time_chunks_from_an_initial_state(monkeypatch, vectorised_scan_variant, case):
    """The vectorised backward's first pass starts every chunk from the initial state, and the gradient of that state is
    what the reverse sweep carries out of the first chunk."""
    monkeypatch.setattr(cpu_scan, "BACKWARD_CHUNK", 16)
    inputs, softplus = case_inputs(case)
    inputs = with_initial_state(inputs)
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    results = run_with_grads(cpu_scan.selective_scan_cpu, inputs, softplus, torch.float32)
    assert_close_to_reference(results, reference, torch.float32)


@pytest.mark.parametrize("growth", [False, True], ids=["decays_only", "with_growth"])
def test_fused_scan_gives_vanishing_decays_and_growing_states(scan_variant, growth):
    """The AVX2 scan takes 2^x with one clamp instead of four when every exponent dt·A is ≤ 0 (a softplus step and
    A ≤ 0, as in Mamba): decays far under the float range must still come out as exactly 0, as in the float64
    reference; an A with a positive entry (a state that grows) must take the general form."""
    inputs = make_inputs(2, 37, 40, 16, use_D=True, use_z=True, use_bias=True, softplus=True)
    A = inputs["A"].clone()
    A[::3, 0] = -2000.0  # dt·A·log2(e) far under -127
    if growth:
        A[1, 1] = 0.05
    inputs["A"] = A
    reference = run_with_grads(kernels.selective_scan_ref, inputs, True, torch.float64)
    assert_close_to_reference(run_with_grads(cpu_scan.selective_scan_cpu, inputs, True, torch.float32), reference,
                              torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_scan_split_in_two_continues_exactly(implementation):
    """Scanning the first steps, then the rest from their last state, gives the whole scan's output and state."""
    inputs, softplus = case_inputs(CASES[-1])
    inputs = {k: None if v is None else v.float() for k, v in inputs.items()}
    scan = IMPLEMENTATIONS[implementation]
    whole, whole_state = scan(**inputs, delta_softplus=softplus, return_last_state=True)
    split = 57
    first, second = ({k: v[..., steps] if v is not None and v.dim() == 3 else v for k, v in inputs.items()}
                     for steps in (slice(0, split), slice(split, None)))
    out_first, state = scan(**first, delta_softplus=softplus, return_last_state=True)
    out_second, last_state = scan(**second, delta_softplus=softplus, initial_state=state, return_last_state=True)
    scale = whole.abs().max().item()
    torch.testing.assert_close(torch.cat([out_first, out_second], dim=-1), whole, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(last_state, whole_state, rtol=0, atol=1e-5 * whole_state.abs().max().item())


def test_cuda_scan_with_an_initial_state_runs_in_plain_pytorch(monkeypatch, caplog):
    """mamba-ssm's scan has no initial state: the CUDA path hands such a scan to the PyTorch one, and says so once."""
    def starts_from_zero(*args, **kwargs):
        raise AssertionError("mamba-ssm's scan would drop the initial state")

    monkeypatch.setattr(kernels, "selective_scan_fn", starts_from_zero)
    monkeypatch.setattr(kernels, "_logged", set())
    inputs, softplus = case_inputs(CASES[1])
    inputs = {k: None if v is None else v.float() for k, v in with_initial_state(inputs).items()}
    expected = kernels.selective_scan_torch(**inputs, delta_softplus=softplus, return_last_state=True)
    with caplog.at_level(logging.WARNING, logger="m2rec.kernels"):
        for _ in range(2):
            actual = kernels._selective_scan_cuda(**inputs, delta_softplus=softplus, return_last_state=True)
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sum("takes no initial state" in r.getMessage() for r in caplog.records) == 1


STATE_UPDATES = {"torch": kernels.selective_state_update_torch, "dispatcher": kernels.selective_state_update}


@pytest.mark.parametrize("implementation", STATE_UPDATES)
@every_dtype
@every_case
def test_state_update_step_by_step_matches_the_scan(case, dtype, implementation):
    """Steps of `selective_state_update` from a given state reproduce the reference scan's outputs and last state."""
    inputs, softplus = case_inputs(case)
    inputs = with_initial_state(inputs)
    expected, expected_state = kernels.selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    cast = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    state = cast["initial_state"].clone()
    outputs = [STATE_UPDATES[implementation](state, cast["u"][..., t], cast["delta"][..., t], cast["A"],
                                             cast["B"][..., t], cast["C"][..., t], D=cast["D"],
                                             z=None if cast["z"] is None else cast["z"][..., t],
                                             dt_bias=cast["delta_bias"], dt_softplus=softplus)
               for t in range(inputs["u"].shape[-1])]
    assert outputs[0].dtype == dtype
    assert_close_to_reference({"out": torch.stack(outputs, dim=-1), "last_state": state},
                              {"out": expected, "last_state": expected_state}, dtype)


CONV_UPDATES = {"torch": kernels.causal_conv1d_update_torch, "dispatcher": kernels.causal_conv1d_update}


@pytest.mark.parametrize("implementation", CONV_UPDATES)
@pytest.mark.parametrize("state_length", ["W-1", "W"])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_update_step_by_step_matches_the_convolution(implementation, state_length, width, use_bias,
                                                                   activation):
    """From a zero state (the sequence's start), steps reproduce the whole convolution, and the state ends holding
    the last inputs, oldest first; a state longer than W - 1 (causal-conv1d's other layout) gives the same."""
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64) if use_bias else None
    expected = naive_causal_conv1d(x, weight, bias, activation)
    state = x.new_zeros(2, 5, width - 1 if state_length == "W-1" else width)
    steps = [CONV_UPDATES[implementation](x[..., t], state, weight, bias, activation) for t in range(x.shape[-1])]
    torch.testing.assert_close(torch.stack(steps, dim=-1), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[..., x.shape[-1] - state.shape[-1]:], rtol=0, atol=0)


def test_causal_conv1d_update_rejects_unknown_activation():
    with pytest.raises(ValueError, match="'relu'"):
        kernels.causal_conv1d_update_torch(torch.zeros(1, 2), torch.zeros(1, 2, 1), torch.zeros(2, 2),
                                           activation="relu")


def channel_last(t):
    """The same values as (B, X, L) viewed from channel-last (B, L, X) memory, as the model passes them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("implementation", ["fused_cpu", "fused_cpu_generic"])
def test_fused_cpu_scan_reads_channel_last_views(implementation):
    softplus = True
    inputs = make_inputs(2, 20, 33, 8, use_D=True, use_z=True, use_bias=True, softplus=softplus)
    viewed = {k: channel_last(v) if v is not None and v.dim() == 3 else v for k, v in inputs.items()}
    expected = run_with_grads(IMPLEMENTATIONS[implementation], inputs, softplus, torch.float32)
    actual = run_with_grads(IMPLEMENTATIONS[implementation], viewed, softplus, torch.float32)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_fused_cpu_forward_without_grad_calls_the_extension_directly(monkeypatch):
    """Without gradient the fused CPU scan and convolution skip the custom ops' dispatch and call the extension:
    the same results (and the scan's last state laid out as the op gives it); with gradient the ops run."""
    if not cpu_scan.fused_kernels_available():
        pytest.skip("the fused CPU kernels are not built")
    inputs = make_inputs(2, 20, 33, 8, use_D=True, use_z=True, use_bias=True, softplus=True)
    inputs = {k: None if v is None else (channel_last(v) if v.dim() == 3 else v).float() for k, v in inputs.items()}
    x, weight, bias = inputs["u"], torch.randn(20, 4), torch.randn(20)
    with_op = (cpu_scan.selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True),
               cpu_scan.causal_conv1d_cpu(x, weight, bias, activation="silu"))
    calls = []
    for name in ("scan_fwd", "conv_fwd"):  # a spy on the ops, which the no-grad path must not call
        op = getattr(cpu_scan.kernel_ops, name)
        monkeypatch.setattr(cpu_scan.kernel_ops, name, lambda *a, _op=op, _name=name: calls.append(_name) or _op(*a))
    with torch.no_grad():
        (out, last_state), conv = (cpu_scan.selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True),
                                   cpu_scan.causal_conv1d_cpu(x, weight, bias, activation="silu"))
    assert calls == []
    assert torch.equal(out, with_op[0][0]) and torch.equal(last_state, with_op[0][1]) and torch.equal(conv, with_op[1])
    assert last_state.is_contiguous()
    cpu_scan.causal_conv1d_cpu(x, weight, bias, activation="silu")
    assert calls == ["conv_fwd"]


@pytest.mark.parametrize("use_z", [False, True])
def test_fused_cpu_backward_recomputes_the_output_and_may_reuse_its_inputs(scan_variant, use_z):
    """`bwd` with return_out gives the forward's output, and with reuse_inputs the same gradients (the memory of u,
    delta, z and dout may then hold them): what MixerCPUFn relies on."""
    extension = cpu_scan.load_cpu_scan()
    inputs = make_inputs(2, 37, 150, 16, use_D=True, use_z=use_z, use_bias=True, softplus=True)
    inputs = {k: None if v is None else (channel_last(v) if v.dim() == 3 else v).float() for k, v in inputs.items()}
    u, delta, A, B, C, D, z, delta_bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    dout = channel_last(torch.randn(u.shape, generator=torch.Generator().manual_seed(2)))
    out, _ = extension.fwd(u, delta, A, B, C, D, z, delta_bias, None, True, scan_variant)
    expected = extension.bwd(dout, u, delta, A, B, C, D, z, delta_bias, None, True, False, False, 64, scan_variant)
    assert expected[-2] is None and expected[-1] is None
    scratch = [None if t is None else channel_last(t.clone()) for t in (dout, u, delta, z)]
    *actual, actual_out, _ = extension.bwd(scratch[0], scratch[1], scratch[2], A, B, C, D, scratch[3], delta_bias,
                                           None, True, True, True, 64, scan_variant)
    # the same sums in another order (the forward keeps two partial sums of C . h)
    torch.testing.assert_close(actual_out, out, rtol=0, atol=TOLERANCE[torch.float32] * out.abs().max().item())
    for name, got, want in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"], actual, expected):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_decays_stay_finite_and_exact(implementation):
    """delta * A goes from -0.5 to below -50 per step (to -9000 on one channel): the decays and
    their products underflow to 0 instead of overflowing, in the forward and the backward."""
    softplus = False
    inputs = make_inputs(2, 4, 150, 8, use_D=True, use_z=True, use_bias=False, softplus=softplus)
    inputs["delta"] = 5.0 + inputs["delta"]  # delta in [5, ~10]
    inputs["A"] = -torch.linspace(0.1, 10.0, 8, dtype=torch.float64).repeat(4, 1)  # (D, N)
    inputs["A"][0] *= 100.0
    inputs.update({name: inputs[name].float().double() for name in ("delta", "A")})  # float32 values
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    results = run_with_grads(IMPLEMENTATIONS[implementation], inputs, softplus, torch.float32)
    assert all(torch.isfinite(v).all() for v in results.values())
    assert_close_to_reference(results, reference, torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_extreme_gates_and_steps_stay_exact(implementation):
    """The vectorised kernels' exponentials clamp their argument: a gate z of ±200 (silu 0 and z) and a raw step of
    ±100 under softplus (0 and 100) still give the reference's forward."""
    inputs, softplus = case_inputs(CASES[-1])
    generator = torch.Generator().manual_seed(5)
    extremes = torch.tensor([-200.0, -100.0, 100.0, 200.0], dtype=torch.float64)
    for name in ("z", "delta"):
        picks = torch.rand(inputs[name].shape, generator=generator, dtype=torch.float64) < 0.2
        values = extremes[torch.randint(0, 4, inputs[name].shape, generator=generator)]
        inputs[name] = torch.where(picks, values / (2.0 if name == "delta" else 1.0), inputs[name])
    expected = kernels.selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    with torch.no_grad():
        actual = IMPLEMENTATIONS[implementation](**{k: None if v is None else v.float() for k, v in inputs.items()},
                                                 delta_softplus=softplus, return_last_state=True)
    assert all(torch.isfinite(t).all() for t in actual)
    assert_close_to_reference(dict(zip(["out", "last_state"], actual)), dict(zip(["out", "last_state"], expected)),
                              torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_precision_inputs_compute_in_float32(implementation):
    softplus = True
    inputs = make_inputs(2, 4, 20, 8, use_D=True, use_z=True, use_bias=True, softplus=softplus)
    half = {k: None if v is None else v.to(torch.bfloat16) for k, v in inputs.items()}
    out = IMPLEMENTATIONS[implementation](**half, delta_softplus=softplus)
    widened = {k: None if v is None else v.double() for k, v in half.items()}
    expected = kernels.selective_scan_ref(**widened, delta_softplus=softplus)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_fused_cpu_rejects_mismatched_shapes():
    inputs = make_inputs(2, 3, 10, 4, use_D=False, use_z=False, use_bias=False, softplus=False)
    inputs["B"] = inputs["B"][:, :, :9]
    with pytest.raises(RuntimeError, match="B and C must be"):
        cpu_scan.selective_scan_cpu(**{k: v.float() for k, v in inputs.items() if v is not None})


class CallCounter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def dispatch_once(monkeypatch, backend=None):
    """Runs `selective_scan` on small CPU inputs with both CPU paths counted; returns the counters
    and whether the result matched the reference."""
    fused, plain = CallCounter(cpu_scan.selective_scan_cpu), CallCounter(kernels.selective_scan_torch)
    monkeypatch.setattr(kernels, "selective_scan_cpu", fused)
    monkeypatch.setattr(kernels, "selective_scan_torch", plain)
    softplus = True
    inputs = make_inputs(2, 4, 12, 8, use_D=True, use_z=True, use_bias=True, softplus=softplus)
    out = kernels.selective_scan(**inputs, delta_softplus=softplus, backend=backend)
    expected = kernels.selective_scan_ref(**inputs, delta_softplus=softplus)
    return fused.calls, plain.calls, torch.allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_dispatcher_uses_fused_path_on_cpu(monkeypatch):
    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)
    assert kernels.resolve_backend("cpu") == "cpu_fused"
    assert kernels.resolve_backend("cpu", "cpu_fused") == "cpu_fused"
    assert dispatch_once(monkeypatch) == (1, 0, True)


def test_env_var_forces_torch_path(monkeypatch, caplog):
    """M2REC_DISABLE_FUSED_CPU, read once at import into `FUSED_CPU_DISABLED`, overrides "auto" and "cpu_fused"."""
    assert cpu_scan.env_flag("M2REC_DISABLE_FUSED_CPU", {"M2REC_DISABLE_FUSED_CPU": "1"})
    assert not cpu_scan.env_flag("M2REC_DISABLE_FUSED_CPU", {"M2REC_DISABLE_FUSED_CPU": "0"})
    assert not cpu_scan.env_flag("M2REC_DISABLE_FUSED_CPU", {})
    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", True)
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.resolve_backend("cpu") == "torch"
        assert kernels.resolve_backend("cpu", "cpu_fused") == "torch"
        assert dispatch_once(monkeypatch) == (0, 1, True)
    assert sum("M2REC_DISABLE_FUSED_CPU" in r.getMessage() for r in caplog.records) == 1


def test_an_explicit_backend_is_taken_or_refused_clearly(monkeypatch):
    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)
    assert kernels.resolve_backend("cpu", "torch") == "torch"
    assert dispatch_once(monkeypatch, backend="torch") == (0, 1, True)
    with pytest.raises(ValueError, match="kernel_backend='cuda' runs on CUDA tensors, got cpu ones"):
        kernels.resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="kernel_backend='cpu_fused' runs on CPU tensors, got meta ones"):
        kernels.resolve_backend("meta", "cpu_fused")
    with pytest.raises(ValueError, match=r"kernel_backend='triton' is not supported; choose one of \('auto'"):
        kernels.resolve_backend("cpu", "triton")


def test_falls_back_and_logs_once_without_compiler(monkeypatch, caplog):
    """Where the extension cannot be built (no compiler, no ninja) the library still works: the
    loader returns None and says why, and the dispatcher logs one warning and uses PyTorch."""

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    monkeypatch.setattr(cpu_scan, "_import_built", lambda name, directory: None)  # as on a machine with no build
    monkeypatch.setattr(cpu_scan, "_module", cpu_scan._UNSET)  # restored to the built module afterwards
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.WARNING):
        assert cpu_scan.load_cpu_scan() is None
        assert kernels.resolve_backend("cpu") == "torch"
        assert dispatch_once(monkeypatch) == (0, 1, True)
        assert dispatch_once(monkeypatch) == (0, 1, True)
        with pytest.raises(RuntimeError, match="kernel_backend='cpu_fused' but the fused CPU kernels could not be"):
            kernels.resolve_backend("cpu", "cpu_fused")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("g++: command not found" in m for m in messages) == 1
    assert sum(m.startswith("fused CPU selective scan unavailable") for m in messages) == 1


def naive_causal_conv1d(x, weight, bias, activation):
    batch, dim, length = x.shape
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(length):
        for k in range(width):
            source = t - width + 1 + k
            if source >= 0:
                out[:, :, t] += weight[:, k] * x[:, :, source]
    if bias is not None:
        out = out + bias[:, None]
    return torch.nn.functional.silu(out) if activation == "silu" else out


CONV_IMPLEMENTATIONS = {"torch": kernels.causal_conv1d_torch, "fused_cpu": cpu_scan.causal_conv1d_cpu,
                        "dispatcher": kernels.causal_conv1d}


@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [2, 37])  # shorter and longer than the kernel
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_naive_loop(implementation, dtype, width, length, use_bias, activation):
    gen = torch.Generator().manual_seed(width + length)
    x = torch.randn(2, 5, length, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64) if use_bias else None
    grad_out = torch.randn(2, 5, length, generator=gen, dtype=torch.float64)
    leaves = [x, weight] + ([bias] if use_bias else [])

    def output_and_grads(conv, cast):
        inputs = [t.detach().to(cast).requires_grad_() for t in leaves]
        out = conv(inputs[0], inputs[1], inputs[2] if use_bias else None, activation)
        out.backward(grad_out.to(cast))
        return [out] + [t.grad for t in inputs]

    expected = output_and_grads(naive_causal_conv1d, torch.float64)
    actual = output_and_grads(CONV_IMPLEMENTATIONS[implementation], dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    for name, got, want in zip(["out", "dx", "dweight", "dbias"], actual, expected):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance, msg=name)


def test_fused_causal_conv1d_reads_channel_last_views():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 20, 11, generator=gen), torch.randn(20, 4, generator=gen), torch.randn(20, generator=gen)
    expected = cpu_scan.causal_conv1d_cpu(x, weight, bias, "silu")
    torch.testing.assert_close(cpu_scan.causal_conv1d_cpu(channel_last(x), weight, bias, "silu"), expected)


@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
def test_causal_conv1d_rejects_unknown_activation(implementation):
    with pytest.raises(ValueError, match="'relu'"):
        CONV_IMPLEMENTATIONS[implementation](torch.zeros(1, 2, 3), torch.zeros(2, 2), activation="relu")


WINDOW_SUMS = {"torch": kernels.filter_window_sum_torch, "fused_cpu": cpu_scan.filter_window_sum_cpu,
               "dispatcher": kernels.filter_window_sum}


def window_case(batch=5, window=70, dim=12, rows=9, kernel_channels=None, seed=0):
    """A step's window (ids, padding 0 in front for some users), an embedded catalogue with a zero row 0, a kernel."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, rows, (batch, window), generator=gen)
    ids[1, :window - 3] = 0  # a user with three events
    table = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    table[0] = 0
    return ids, table, torch.randn(window, kernel_channels or dim, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("implementation", WINDOW_SUMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel_channels", [None, 1], ids=["learned W", "fixed filter"])
def test_filter_window_sum_paths_equal_the_definition(implementation, dtype, kernel_channels):
    """The cached step's window sum on every path (the twin sums 64-lag blocks; 70 lags leave a short last one)
    equals the float64 definition; a fixed filter's (W, 1) kernel broadcasts over the channels."""
    ids, table, kernel = window_case(kernel_channels=kernel_channels)
    expected = kernels.filter_window_sum_ref(ids, table, kernel)
    actual = WINDOW_SUMS[implementation](ids, table.to(dtype), kernel.to(dtype))
    assert actual.shape == (5, 12) and actual.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("lags", [1, 3, 64, 1000])
def test_filter_window_sum_twin_in_blocks_of_lags_equals_one_block(monkeypatch, lags):
    ids, table, kernel = window_case()
    monkeypatch.setattr(kernels, "WINDOW_LAGS_PER_BLOCK", lags)
    torch.testing.assert_close(kernels.filter_window_sum_torch(ids, table.float(), kernel.float()).double(),
                               kernels.filter_window_sum_ref(ids, table, kernel), rtol=1e-5, atol=1e-5)


def test_filter_window_sum_dispatcher_takes_the_twin_for_gradients():
    """The fused loop has no backward: where the table or the kernel wants a gradient the dispatcher runs the twin,
    whose gradients are the definition's."""
    ids, table, kernel = window_case()
    inputs = [t.float().requires_grad_() for t in (table, kernel)]
    kernels.filter_window_sum(ids, *inputs, backend="cpu_fused").sum().backward()
    reference = [t.clone().requires_grad_() for t in (table, kernel)]
    kernels.filter_window_sum_ref(ids, *reference).sum().backward()
    for got, want in zip(inputs, reference):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_fused_filter_window_sum_refuses_ids_outside_the_table():
    ids, table, kernel = window_case()
    for bad in (9, -1):
        ids[2, 5] = bad
        with pytest.raises(RuntimeError, match=r"window_ids holds an id outside the table's rows 0\.\.8"):
            cpu_scan.filter_window_sum_cpu(ids, table.float(), kernel.float())
    with pytest.raises(RuntimeError, match=r"kernel must be \(W, D\) = \(70, 12\)"):
        cpu_scan.filter_window_sum_cpu(ids.clamp(0, 8), table.float(), kernel[:-1].float())


FILTER_CONVOLUTIONS = {"fft": kernels.causal_fft_convolution, "torch": kernels.causal_fft_convolution_torch,
                       "fused_cpu": cpu_scan.causal_filter_cpu, "dispatcher": kernels.causal_filter_convolution}


@pytest.mark.parametrize("implementation", FILTER_CONVOLUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel_lags", [21, 9, 1], ids=["lags beyond L", "lags up to L", "one lag"])
@pytest.mark.parametrize("kernel_channels", [6, 1], ids=["learned W", "fixed filter"])
@pytest.mark.parametrize("layout", ["channel-first", "channel-last"])
def test_causal_filter_paths_equal_the_definition(implementation, dtype, kernel_lags, kernel_channels, layout):
    """The filter's convolution on every path equals the float64 sum over the lags, for lengths on both sides of the
    direct loop's blocks of 4 positions, kernels longer and shorter than the input, and x in either layout."""
    gen = torch.Generator().manual_seed(3)
    for length in (1, 3, 4, 9, 13):
        x = torch.randn(2, 6, length, generator=gen, dtype=torch.float64)
        if layout == "channel-last":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        kernel = torch.randn(kernel_channels, kernel_lags, generator=gen, dtype=torch.float64)
        expected = kernels.causal_fft_convolution_ref(x, F.pad(kernel, (0, max(0, length - kernel_lags)))[:, :length])
        with torch.no_grad():
            actual = FILTER_CONVOLUTIONS[implementation](x.to(dtype), kernel[:, :length].to(dtype))
        assert actual.shape == x.shape and actual.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


def test_causal_filter_dispatcher_sums_short_inputs_directly_without_gradient(monkeypatch):
    """The dispatcher takes the direct loop on the fused CPU backend for inputs up to DIRECT_FILTER_MAX_LENGTH
    without gradient, and the FFT convolution (which has a backward) for longer inputs, for gradients and on the
    torch backend."""
    calls = []
    monkeypatch.setattr(kernels, "causal_filter_cpu", lambda *args: calls.append("direct") or args[0])
    monkeypatch.setattr(kernels, "causal_fft_convolution", lambda *args: calls.append("fft") or args[0])
    longest = kernels.DIRECT_FILTER_MAX_LENGTH
    short, long = torch.randn(1, 4, longest), torch.randn(1, 4, longest + 1)
    kernel = torch.randn(4, longest, requires_grad=True)
    with torch.no_grad():
        kernels.causal_filter_convolution(short, kernel, backend="cpu_fused")
        kernels.causal_filter_convolution(long, kernel, backend="cpu_fused")
        kernels.causal_filter_convolution(short, kernel, backend="torch")
    kernels.causal_filter_convolution(short, kernel, backend="cpu_fused")  # W wants a gradient
    kernels.causal_filter_convolution(short, kernel.detach(), backend="cpu_fused")
    assert calls == ["direct", "fft", "fft", "fft", "direct"]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@requires_cuda
def test_torch_scan_on_cuda_matches_reference():
    softplus = True
    inputs = make_inputs(2, 8, 100, 16, use_D=True, use_z=True, use_bias=True, softplus=softplus)
    reference = run_with_grads(kernels.selective_scan_ref, inputs, softplus, torch.float64)
    on_gpu = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    results = run_with_grads(kernels.selective_scan_torch, on_gpu, softplus, torch.float32)
    assert_close_to_reference({k: v.cpu() for k, v in results.items()}, reference, torch.float32)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(kernels.selective_scan_fn is None, reason="needs mamba-ssm")
def test_cuda_scan_matches_torch_scan():
    softplus = True
    inputs = make_inputs(2, 64, 200, 16, use_D=True, use_z=True, use_bias=True, softplus=softplus)
    on_gpu = {k: None if v is None else v.float().cuda() for k, v in inputs.items()}
    assert kernels.resolve_backend("cuda") == "cuda"
    fast = run_with_grads(kernels.selective_scan, on_gpu, softplus, torch.float32)
    plain = run_with_grads(kernels.selective_scan_torch, on_gpu, softplus, torch.float32)
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(kernels.causal_conv1d_fn is None, reason="needs causal-conv1d")
def test_cuda_causal_conv1d_matches_torch():
    x = torch.randn(2, 64, 50, device="cuda")
    weight, bias = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    for activation in (None, "silu"):
        torch.testing.assert_close(
            kernels.causal_conv1d(x, weight, bias, activation),
            kernels.causal_conv1d_torch(x, weight, bias, activation),
            rtol=1e-4,
            atol=1e-4,
        )


def test_a_lock_left_by_a_killed_compile_does_not_block_loading(tmp_path):
    """torch's build lock waits forever on a lock file whose owner was killed: an old one is removed, a fresh one
    (a compile in progress elsewhere) is kept, and a finished build is imported without taking the lock."""
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_scan._remove_stale_lock(str(tmp_path))
    assert lock.exists()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    cpu_scan._remove_stale_lock(str(tmp_path))
    assert not lock.exists()
    assert cpu_scan._import_built("m2rec_cpu_scan_missing", str(tmp_path)) is None


def test_a_first_build_is_announced_before_it_starts(monkeypatch, tmp_path):
    """With an empty TORCH_EXTENSIONS_DIR the first use compiles C++ for about a minute: a WARNING saying what, why,
    how long, where and how to skip it must come before the compiler starts, not an INFO line after it."""
    events = []

    class Recorder(logging.Handler):
        def emit(self, record):
            events.append(("log", record.levelno, record.getMessage()))

    def compile_extension(**kwargs):
        events.append(("build", kwargs["build_directory"]))
        return "compiled module"

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", compile_extension)
    monkeypatch.setattr(cpu_scan, "_module", cpu_scan._UNSET)  # restored to the built module afterwards
    recorder = Recorder()
    cpu_scan.logger.addHandler(recorder)
    try:
        assert cpu_scan.load_cpu_scan() == "compiled module"
        assert cpu_scan.load_cpu_scan() == "compiled module"  # once per process
    finally:
        cpu_scan.logger.removeHandler(recorder)
    build_directory = str(tmp_path / cpu_scan._extension_name())
    assert events[0][:2] == ("log", logging.WARNING) and events[1] == ("build", build_directory)
    assert [event for event in events[2:] if event[0] == "build" or event[1] >= logging.WARNING] == []
    message = events[0][2]
    for part in ("compiling the fused CPU kernels", "selective scan and causal convolution", torch.__version__,
                 cpu_scan.BUILD_TIME_HINT, build_directory, "m2rec-build-kernels", "M2REC_DISABLE_FUSED_CPU=1"):
        assert part in message


def test_build_kernels_command_reports_the_cache_and_the_scan_variant(monkeypatch, capsys):
    """`m2rec-build-kernels` (pyproject's console script) builds or finds the extension and says where it is cached
    and which vectorised scan runs, naming M2REC_VECTOR_ISA when it asks for a narrower one than the CPU has; it fails
    with exit status 1 where the kernels cannot be built."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["m2rec-build-kernels"] == "m2rec.cpu_scan:build_kernels_main"

    assert cpu_scan.build_kernels_main([]) == 0  # the cache built by the tests above, so this is fast
    out = capsys.readouterr().out
    assert f"cached in {cpu_scan._build_directory(cpu_scan._extension_name())}" in out
    widest = {width: name for name, width in cpu_scan.VECTOR_WIDTHS.items()}[cpu_scan.cpu_vector_width()]
    assert f"selective scan vectorised with: {widest}\n" in out
    monkeypatch.setattr(cpu_scan, "VECTOR_WIDTH_ALLOWED", 0)
    assert cpu_scan.build_kernels_main([]) == 0
    out = capsys.readouterr().out
    assert "selective scan vectorised with: none" in out
    assert ("M2REC_VECTOR_ISA" in out) == (widest != "none")

    monkeypatch.setattr(cpu_scan, "load_cpu_scan", lambda: None)
    assert cpu_scan.build_kernels_main([]) == 1
    assert "could not be built" in capsys.readouterr().err


# ------------------------------------------------------------------------- causal FFT convolution, cross-entropy


@pytest.mark.parametrize("kernel_channels", [3, 1], ids=["per_channel", "shared"])
def test_causal_fft_convolution_paths_equal_the_definition(kernel_channels):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(kernel_channels, 9, generator=generator, dtype=torch.float64,
                         requires_grad=kernel_channels == 3)
    expected = kernels.causal_fft_convolution_ref(x, kernel)
    cotangent = torch.randn_like(expected)
    inputs = (x, kernel) if kernel.requires_grad else (x,)
    expected_grads = torch.autograd.grad(expected, inputs, cotangent)
    for path in (kernels.causal_fft_convolution, kernels.causal_fft_convolution_torch):
        for give_spectrum in (False, True):  # a given spectrum gets no gradient; the kernel still does
            longer = torch.cat([kernel, kernel], dim=-1)  # the spectrum reads its first 9 lags
            out = path(x, kernel, kernels.causal_fft_kernel_spectrum(longer, 9) if give_spectrum else None)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
            for grad, reference in zip(torch.autograd.grad(out, inputs, cotangent), expected_grads):
                torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(kernels.causal_fft_convolution, (x, kernel))


@pytest.mark.parametrize("seen_items", ["none", "offset", "excluded"])
def test_cross_entropy_paths_equal_the_definition(seen_items):
    """The chunked cross-entropy (3 chunks here) and its twin against the float64 definition, with rows labelled
    -100 and, with the seen-item offset or their exclusion, repeated items that count once and seen targets
    (revisits)."""
    states, weights, labels, offset, seen = _loss_case(torch.Generator().manual_seed(1), seen_items != "none",
                                                       num_items=5000)
    exclude_seen = seen_items == "excluded"
    offset = None if exclude_seen else offset
    inputs = (states, weights, offset) if offset is not None else (states, weights)
    expected = kernels.full_softmax_cross_entropy_ref(states, weights, labels, offset, seen, exclude_seen)
    expected_grads = torch.autograd.grad(expected, inputs)
    for path in (kernels.full_softmax_cross_entropy, kernels.full_softmax_cross_entropy_torch):
        loss = path(states, weights, labels, offset, seen, exclude_seen)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        for grad, reference in zip(torch.autograd.grad(loss, inputs), expected_grads):
            torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-15)


def test_excluded_seen_items_leave_the_softmax_but_a_seen_target_stays():
    """Row by row from the definition: the log-softmax over the items the row's position has not seen, plus its
    target; and exclusion never goes with an offset, nor without the seen items."""
    states, weights, labels, offset, seen = _loss_case(torch.Generator().manual_seed(3), True)
    first_items, rows, positions = seen
    losses = []
    for m in (labels != -100).nonzero().flatten().tolist():
        seen_here = set(first_items[rows[m], :positions[m] + 1].tolist()) - {0, labels[m].item()}
        kept = [item for item in range(1, weights.shape[0]) if item not in seen_here]
        logits = weights[kept] @ states[m]
        losses.append(logits.logsumexp(0) - logits[kept.index(labels[m].item())])
    revisits = [m for m in range(len(labels)) if labels[m] > 0 and labels[m] in first_items[rows[m], :positions[m] + 1]]
    assert revisits  # the case has seen targets, which must stay winnable
    torch.testing.assert_close(kernels.full_softmax_cross_entropy(states, weights, labels, None, seen, True),
                               torch.stack(losses).mean(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="one or the other"):
        kernels.full_softmax_cross_entropy(states, weights, labels, offset, seen, True)
    with pytest.raises(ValueError, match="seen goes with"):
        kernels.full_softmax_cross_entropy_torch(states, weights, labels, None, None, True)


def test_first_occurrences_blank_the_repeats():
    item_ids = torch.tensor([[3, 1, 3, 2, 1, 0, 0], [5, 5, 5, 4, 0, 0, 0]])
    assert kernels.first_occurrences(item_ids).tolist() == [[3, 1, 0, 2, 0, 0, 0], [5, 0, 0, 4, 0, 0, 0]]


def test_first_positions_find_each_items_first_position():
    first_items = kernels.first_occurrences(torch.tensor([[3, 1, 3, 2, 0, 0], [5, 5, 4, 0, 0, 0]]))
    found = kernels.first_positions(first_items, torch.tensor([[1, 2, 3, 4], [4, 5, 1, 9]]))
    assert found.tolist() == [[1, 3, 0, 6], [2, 0, 6, 6]]


def _loss_case(generator, with_offset, num_items=300):
    """700 rows over 3 sequences of a catalogue of num_items, labels with repeats, seen targets and -100 rows."""
    item_ids = torch.randint(1, num_items, (3, 30), generator=generator)
    item_ids[2, 20:] = 0
    item_ids[1, 10:20] = item_ids[1, :10]
    rows = torch.randint(0, 3, (700,), generator=generator)
    positions = torch.randint(0, 20, (700,), generator=generator)
    states = torch.randn(700, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(num_items, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = item_ids[rows, positions]
    labels[::2] = torch.randint(1, num_items, (350,), generator=generator)
    labels[::7] = -100
    offset = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True) if with_offset else None
    seen = (kernels.first_occurrences(item_ids), rows, positions) if with_offset else None
    return states, weights, labels, offset, seen


@pytest.mark.parametrize("with_offset", [False, True], ids=["plain", "seen_offset"])
def test_sampled_softmax_with_every_item_once_is_the_full_softmax(with_offset):
    """Every item once as a negative, expected count 1: the target's own column is the accidental hit left out, so
    loss and gradients are exactly the full softmax's (and the seen-item offset lands on the same items)."""
    states, weights, labels, offset, seen = _loss_case(torch.Generator().manual_seed(2), with_offset)
    inputs = (states, weights, offset) if with_offset else (states, weights)
    expected = kernels.full_softmax_cross_entropy_ref(states, weights, labels, offset, seen)
    every_item = torch.randperm(299) + 1  # order does not matter
    loss = kernels.sampled_softmax_cross_entropy(states, weights, labels, every_item, torch.zeros(299, dtype=torch.float64),
                                                 offset, seen)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for grad, reference in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-15)


def _sequence_slots(rows, num_sequences):
    """Each row's place among the rows of its sequence, and the number of places: unique (sequence, slot) pairs."""
    slots = torch.zeros_like(rows)
    for sequence in range(num_sequences):
        members = (rows == sequence).nonzero().flatten()
        slots[members] = torch.arange(len(members))
    return slots, int(slots.max()) + 1


@pytest.mark.parametrize("with_offset", [False, True], ids=["plain", "seen_offset"])
def test_per_sequence_negatives_with_every_item_once_are_the_full_softmax(with_offset):
    """One draw per sequence (G, K), each the whole catalogue in its own order: the batched product gives every row
    exactly the full softmax's loss and gradients, as the shared draw does."""
    states, weights, labels, offset, seen = _loss_case(torch.Generator().manual_seed(2), with_offset)
    rows = seen[1] if with_offset else torch.randint(0, 3, (700,), generator=torch.Generator().manual_seed(7))
    slots, num_slots = _sequence_slots(rows, 3)
    inputs = (states, weights, offset) if with_offset else (states, weights)
    expected = kernels.full_softmax_cross_entropy_ref(states, weights, labels, offset, seen)
    every_item = torch.stack([torch.randperm(299) + 1 for _ in range(3)])  # (G, K)
    loss = kernels.sampled_softmax_cross_entropy(states, weights, labels, every_item,
                                                 torch.zeros(3, 299, dtype=torch.float64), offset, seen,
                                                 sequences=(rows, slots, num_slots))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for grad, reference in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="per-sequence negatives"):
        kernels.sampled_softmax_cross_entropy(states, weights, labels, every_item, torch.zeros(3, 299), offset, seen)


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_per_sequence_draws_are_independent_with_the_same_correction(sampler):
    """num_groups draws (G, K): each group its own negatives, each corrected by the same expected count as one
    shared draw of K; the in-batch samplers, which draw from the whole batch, refuse groups."""
    torch.manual_seed(6)
    labels, counts = torch.tensor([1, 2, 3, -100]), torch.arange(41).double()
    negatives, log_expected = kernels.draw_negatives(sampler, 500, labels, 40, counts, num_groups=3)
    assert negatives.shape == log_expected.shape == (3, 500)
    assert negatives.min() >= 1 and negatives.max() <= 40
    assert not torch.equal(negatives[0], negatives[1])
    shared, shared_log_expected = kernels.draw_negatives(sampler, 500, labels, 40, counts)
    expected = torch.zeros(41).scatter_(0, shared, shared_log_expected)  # the shared draw's correction per item
    torch.testing.assert_close(log_expected, expected[negatives])
    for in_batch in ("in_batch", "mixed"):
        with pytest.raises(ValueError, match="per-sequence negatives take 'uniform' or 'popularity'"):
            kernels.draw_negatives(in_batch, 8, labels, 40, num_groups=3)


@pytest.mark.parametrize("sampler", ["uniform", "popularity", "mixed"])
def test_sampled_softmax_approaches_the_full_softmax_with_many_draws(sampler):
    """The logQ-corrected estimate of the normaliser is unbiased, so with many draws the loss and the gradient of
    the user states converge to the full softmax's; with few draws, the loss is clearly off (the test can fail)."""
    torch.manual_seed(3)
    states, weights, labels, _, _ = _loss_case(torch.Generator().manual_seed(3), False)
    states_grad, labels = states[:100].detach().requires_grad_(), labels[:100]
    counts = torch.randint(0, 50, (300,)).double()
    expected = kernels.full_softmax_cross_entropy_ref(states_grad, weights.detach(), labels)
    (expected_grad,) = torch.autograd.grad(expected, states_grad)

    def sampled(num_negatives):
        negatives, log_expected = kernels.draw_negatives(sampler, num_negatives, labels, 299, counts)
        loss = kernels.sampled_softmax_cross_entropy(states_grad, weights.detach(), labels, negatives,
                                                     log_expected.double())
        return loss, torch.autograd.grad(loss, states_grad)[0]

    loss, grad = sampled(100_000)
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=0)
    assert (grad - expected_grad).norm() < 0.02 * expected_grad.norm()
    assert (sampled(5)[0] - expected).abs() > 0.1  # few draws: a loose estimate


def test_in_batch_negatives_approach_the_softmax_over_the_batch_targets():
    """In-batch negatives only draw the batch's targets: taking all of them (K ≥ M) with the correction is the
    softmax over the items that some row targets, exactly."""
    states, weights, labels, _, _ = _loss_case(torch.Generator().manual_seed(4), False)
    negatives, log_expected = kernels.draw_negatives("in_batch", 10_000, labels, 299)
    targets = labels[labels != -100]
    assert len(negatives) == len(targets) and sorted(negatives.tolist()) == sorted(targets.tolist())
    loss = kernels.sampled_softmax_cross_entropy(states, weights, labels, negatives, log_expected.double())
    in_batch = targets.unique()
    logits = states @ weights[in_batch].t()  # the softmax over the batch's distinct targets
    labelled = labels != -100
    expected = (logits[labelled].logsumexp(1) - (states[labelled] * weights[labels[labelled]]).sum(1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # the log expected counts come in float32


@pytest.mark.parametrize("sampler", ["uniform", "popularity", "in_batch", "mixed"])
def test_each_samplers_correction_is_its_expected_count(sampler):
    """Over many batches of draws, each item comes up on average exp(log expected count) times per batch: the
    correction each sampler reports is its own sampling distribution (popularity ∝ count + 1, in-batch ∝ the batch's
    targets, mixed the sum of its parts), and padding is never drawn."""
    torch.manual_seed(5)
    num_items, num_negatives, batches = 40, 16, 20_000
    counts = torch.cat([torch.zeros(1), torch.arange(num_items).double() ** 2])  # item 1 never seen in training
    labels = torch.tensor([3, 3, 3, 7, 7, 11, -100, 20, 20, 20, 20, 39, 40] * 3)
    draws = [kernels.draw_negatives(sampler, num_negatives, labels, num_items, counts) for _ in range(batches)]
    negatives = torch.cat([n for n, _ in draws])
    assert negatives.min() >= 1 and negatives.max() <= num_items
    observed = torch.bincount(negatives, minlength=num_items + 1)[1:].double() / batches  # per batch
    reported = torch.cat([log_expected for _, log_expected in draws]).double().exp()
    expected = torch.zeros(num_items, dtype=torch.float64).scatter_(0, negatives - 1, reported)
    # a function of the item alone (every batch is the same here)
    torch.testing.assert_close(reported, expected[negatives - 1])
    drawn = observed > 0
    # Poisson noise: std of a per-batch mean is sqrt(expected / batches)
    assert ((observed[drawn] - expected[drawn]).abs() <= 5 * (expected[drawn] / batches).sqrt() + 1e-3).all()
    assert (observed.sum() - num_negatives).abs() < 1e-9 or sampler == "in_batch"
    if sampler == "popularity":
        weights = counts[1:] + 1
        torch.testing.assert_close(expected[drawn], (num_negatives * weights / weights.sum())[drawn])
    if sampler == "uniform":
        torch.testing.assert_close(expected[drawn], torch.full_like(expected[drawn], num_negatives / num_items))
    if sampler == "in_batch":
        assert set(negatives.tolist()) == {3, 7, 11, 20, 39, 40}


def test_samplers_refuse_bad_settings():
    labels = torch.tensor([1, 2, -100])
    with pytest.raises(ValueError, match="set_item_counts"):
        kernels.draw_negatives("popularity", 4, labels, 10)
    with pytest.raises(ValueError, match=r"item_counts has shape \(5,\).*\(11,\)"):
        kernels.draw_negatives("popularity", 4, labels, 10, torch.ones(5))
    with pytest.raises(ValueError, match="'zipf' is not supported"):
        kernels.draw_negatives("zipf", 4, labels, 10)
    with pytest.raises(ValueError, match="every label is -100"):
        kernels.draw_negatives("in_batch", 4, torch.tensor([-100, -100]), 10)


def _top_k_case(generator, batch=6, num_items=5000, hidden=16, near_ties=False):
    states = torch.randn(batch, hidden, generator=generator)
    weights = torch.randn(num_items + 1, hidden, generator=generator) * torch.rand(num_items + 1, 1, generator=generator)
    if near_ties:  # many items a hair apart in score: the bfloat16 bound cannot separate them
        weights[1:3000] = weights[1] + 1e-6 * torch.randn(2999, hidden, generator=generator)
    offset_items = kernels.first_occurrences(torch.randint(0, num_items + 1, (batch, 40), generator=generator))
    offset_values = torch.full((batch, 40), -0.75)
    excluded = torch.randint(0, num_items + 1, (batch, 30), generator=generator)
    return states, weights, offset_items, offset_values, excluded


def _assert_same_top_k_up_to_ties(items, states, weights, k, offset_items, offset_values, excluded):
    """items (B, k) are a top k of the float64 scores: every item clearly above the k-th score is in, and none is
    clearly below it (ties at float32 rounding either way)."""
    reference = states.double() @ weights.double().t()
    kernels._adjust_chunk(reference, 0, offset_items, offset_values.double(), excluded)
    reference.masked_fill_(reference <= torch.finfo(torch.float64).min, torch.finfo(torch.float32).min)
    kth = reference.topk(k, dim=1).values[:, -1:]
    tolerance = 1e-5 * reference.abs().clamp(min=1).max()
    returned = torch.zeros_like(reference, dtype=torch.bool).scatter_(1, items, True)
    assert items.unique(dim=None).numel() > 0 and (items > 0).all()
    assert all(len(set(row.tolist())) == k for row in items)
    assert not (returned & (reference < kth - tolerance)).any()
    assert not (~returned & (reference > kth + tolerance)).any()


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("near_ties", [False, True], ids=["random", "near_ties"])
def test_chunked_top_k_is_the_float32_top_k_up_to_ties(bf16, near_ties):
    """Chunks of 700 items (not dividing the catalogue), a running top k merged after each: the same top k as the
    full float32 ranking, with the offsets on seen items, the excluded items after all others (k = 4,990 reaches
    into them) and padding never returned; in bfloat16 too (on any CPU: emulated where not native)."""
    states, weights, offset_items, offset_values, excluded = _top_k_case(torch.Generator().manual_seed(6),
                                                                         near_ties=near_ties)
    for k in (1, 10, 2500, 4990):  # 2,500: a border where bfloat16 alone would swap items
        scores, items = kernels.top_k_items(states, weights, k, chunk_size=700, bf16=bf16, offset_items=offset_items,
                                            offset_values=offset_values, excluded_items=excluded)
        _assert_same_top_k_up_to_ties(items, states, weights, k, offset_items, offset_values, excluded)
        twin_scores, twin_items = kernels.top_k_items_torch(states, weights, k, offset_items=offset_items,
                                                           offset_values=offset_values, excluded_items=excluded)
        torch.testing.assert_close(scores, twin_scores, rtol=1e-5, atol=1e-5)  # in order, best first
        if k == 4990:  # beyond the items left: the excluded ones come last, at float32's lowest value
            assert (scores[:, -1] == torch.finfo(torch.float32).min).all()


def test_bf16_scores_stay_within_the_error_bound():
    """The bound the bfloat16 pre-selection relies on, checked on this machine's bfloat16 products, at several
    scales and widths."""
    generator = torch.Generator().manual_seed(7)
    for hidden, scale in ((16, 1e-3), (64, 1.0), (256, 30.0)):
        states = torch.randn(32, hidden, generator=generator) * scale
        weights = torch.randn(4000, hidden, generator=generator) * torch.rand(4000, 1, generator=generator)
        exact = states.double() @ weights.double().t()
        approximate = (states.bfloat16() @ weights.bfloat16().t()).double()
        bound = kernels.bf16_score_error_bound(hidden) * states.norm(dim=1, keepdim=True) * weights.norm(dim=1)
        assert ((approximate - exact).abs() <= bound).all()
        assert (approximate - exact).abs().max() > bound.max() * 1e-3  # the products really were rounded


def test_chunked_top_k_memory_is_bounded_by_the_chunk():
    """No tensor the chunked top k creates is larger than a chunk's scores (B × chunk_size) or weights
    (chunk_size × D): recorded for every operator through a dispatch mode, on a catalogue 40× the chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, tensor.numel())
            return out

    states, weights, offset_items, offset_values, excluded = _top_k_case(torch.Generator().manual_seed(8),
                                                                         batch=8, num_items=40_000, hidden=16)
    for bf16 in (False, True):
        LargestOutput.largest = 0
        with LargestOutput():
            kernels.top_k_items(states, weights, 10, chunk_size=1000, bf16=bf16, offset_items=offset_items,
                                offset_values=offset_values, excluded_items=excluded)
        assert 0 < LargestOutput.largest <= max(8 * 1000, 1000 * 16)
    LargestOutput.largest = 0
    with LargestOutput():  # the twin, for contrast: the whole (B, I) score matrix
        kernels.top_k_items_torch(states, weights, 10)
    assert LargestOutput.largest >= 8 * 40_001


def test_vector_isa_override_is_checked():
    """M2REC_VECTOR_ISA, read once at import: a name of VECTOR_WIDTHS caps the scan's variant, "auto" or unset
    leaves the widest, and anything else fails naming the choices instead of being ignored."""
    assert cpu_scan._vector_isa_override({}) == cpu_scan._vector_isa_override({"M2REC_VECTOR_ISA": "auto"}) == 16
    assert cpu_scan._vector_isa_override({"M2REC_VECTOR_ISA": "AVX2"}) == 8
    assert cpu_scan._vector_isa_override({"M2REC_VECTOR_ISA": "none"}) == 0
    with pytest.raises(ValueError, match="M2REC_VECTOR_ISA='sse4'.*auto, avx512, avx2, none"):
        cpu_scan._vector_isa_override({"M2REC_VECTOR_ISA": "sse4"})
    with cpu_scan.vector_isa("avx2"):
        assert cpu_scan.vector_width() == min(8, cpu_scan.cpu_vector_width())
    assert cpu_scan.vector_width() == min(cpu_scan.VECTOR_WIDTH_ALLOWED, cpu_scan.cpu_vector_width())
