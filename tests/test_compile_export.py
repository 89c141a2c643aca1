"""torch.compile and torch.export through the model: the fused CPU kernels are torch custom ops (fake
implementations, autograd), the input checks that read values run in eager mode only, and the compiled training step,
the exported inference programs (static and dynamic batch, ONNX) and the exported one-event step equal eager."""

import copy

import pytest
import torch
import torch.nn.functional as F

from m2rec import M2RecConfig, M2RecForSequentialRecommendation, cpu_scan
from m2rec.modeling_m2rec import _flatten_cache

NUM_ITEMS = 30
MAX_LEN = 10


@pytest.fixture(autouse=True)
def fused_cpu_allowed(monkeypatch):
    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)


def tiny_model(kernel_backend, seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, state_size=8, text_embedding_dim=12,
                   hidden_dropout_prob=0.0, kernel_backend=kernel_backend)
    options.update(overrides)
    model = M2RecForSequentialRecommendation(M2RecConfig(**options))
    with torch.no_grad():  # away from the initialisation, where several gradients are exactly zero
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        text = torch.randn(NUM_ITEMS + 1, 12)
        text[0] = 0
        model.set_text_embeddings(text)
    return model


def histories(batch, seed=1):
    input_ids = torch.randint(1, NUM_ITEMS + 1, (batch, MAX_LEN), generator=torch.Generator().manual_seed(seed))
    input_ids[0, MAX_LEN // 2:] = 0  # users of different lengths
    return input_ids


class LastScores(torch.nn.Module):
    """The inference path to export: histories (B, L) → next-item scores (B, I)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, last_position_only=True).logits


class StepScores(torch.nn.Module):
    """The one-event step to export: new items (B, 1) and a cache, continued in place → scores (B, I)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, new_items, cache):
        return self.model(new_items, cache_params=cache, last_position_only=True).logits


# ------------------------------------------------------------------------------------------------- custom ops


def sequence(channel_last, batch=2, dim=20, length=7):
    """A (B, D, L) tensor: contiguous rows, or a transposed view of channel-last memory (what the AVX-512 kernels
    read in place and then also write)."""
    return torch.randn(batch, length, dim).transpose(1, 2) if channel_last else torch.randn(batch, dim, length)


@pytest.mark.parametrize("channel_last", [True, False], ids=["channel_last", "rows"])
@pytest.mark.parametrize("optional_inputs", [True, False], ids=["all_inputs", "required_only"])
@pytest.mark.parametrize("width", [16, 8, 0], ids=["avx512", "avx2", "generic"])
def test_custom_ops_pass_opcheck(channel_last, optional_inputs, width):
    """torch.library.opcheck runs each op for real and on fake tensors (shapes and strides must agree), under
    AOT autograd, and checks its autograd registration against the schema."""
    torch.manual_seed(0)
    dim, state = 20, 5

    def optional(make):
        return make() if optional_inputs else None

    def scan_inputs():
        return [sequence(channel_last), 0.1 * sequence(channel_last), -torch.rand(dim, state),
                torch.randn(2, state, 7), torch.randn(2, state, 7), optional(lambda: torch.randn(dim)),
                optional(lambda: sequence(channel_last)), optional(lambda: torch.randn(dim)),
                optional(lambda: torch.randn(2, dim, state))]

    differentiable = [None if t is None else t.requires_grad_() for t in scan_inputs()]
    torch.library.opcheck(cpu_scan.kernel_ops.scan_fwd, (*differentiable, True, width))
    torch.library.opcheck(cpu_scan.kernel_ops.scan_bwd, (sequence(channel_last), *scan_inputs(), True, True, 1024,
                                                         width))
    x, weight = sequence(channel_last).requires_grad_(), torch.randn(dim, 4, requires_grad=True)
    bias = optional(lambda: torch.randn(dim, requires_grad=True))
    torch.library.opcheck(cpu_scan.kernel_ops.conv_fwd, (x, weight, bias, True))
    torch.library.opcheck(cpu_scan.kernel_ops.conv_bwd, (sequence(channel_last), x.detach(), weight.detach(),
                                                         None if bias is None else bias.detach(), True))
    # the cached step's window sum (inference only, no autograd)
    window_ids = torch.randint(0, 9, (3, 7))
    torch.library.opcheck(cpu_scan.kernel_ops.window_sum, (window_ids, torch.randn(9, dim), torch.randn(7, dim)))
    # the causal filter summed directly (inference only, no autograd)
    torch.library.opcheck(cpu_scan.kernel_ops.causal_filter, (sequence(channel_last), torch.randn(dim, 5)))


def test_a_remote_code_copy_in_the_same_process_uses_the_same_ops(tmp_path):
    """A checkpoint's remote-code copy of the model, imported next to the installed package, finds the ops of its
    (identical) source defined already and runs them, forward and backward."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model = tiny_model("cpu_fused").eval()
    model.save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module("modeling_m2rec.M2RecForSequentialRecommendation", str(tmp_path))
    assert remote_class is not M2RecForSequentialRecommendation
    remote = remote_class.from_pretrained(tmp_path).eval()
    input_ids = histories(2)
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids).logits, model(input_ids).logits)
    expected_loss, expected = training_step(model.train(), input_ids)
    loss, gradients = training_step(remote.train(), input_ids)
    torch.testing.assert_close(loss, expected_loss)
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, msg=name)


# ------------------------------------------------------------------------------------------------- compile


def training_step(model, input_ids):
    """Next-item cross-entropy at every labelled position, backward: (loss, gradients by parameter name)."""
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[labels == 0] = -100
    logits = model(input_ids).logits  # (B, L, I)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    gradients = {name.removeprefix("_orig_mod."): parameter.grad.clone()
                 for name, parameter in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), gradients


@pytest.mark.parametrize("kernel_backend, compiler", [("torch", "aot_eager"), ("cpu_fused", "aot_eager"),
                                                      ("cpu_fused", "inductor")])
def test_a_compiled_training_step_equals_eager(kernel_backend, compiler):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, without a graph break: through
    the fused CPU custom ops (and MixerCPUFn) and through the chunked PyTorch scan. (aot_eager traces as inductor
    does without generating code; inductor's code generation for the chunked scan takes a minute on 2 cores.)"""
    model = tiny_model(kernel_backend, num_hidden_layers=2).train()
    input_ids = histories(3)
    expected_loss, expected = training_step(model, input_ids)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    loss, gradients = training_step(compiled, input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=0, atol=1e-5 * gradient.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("labels_shape", ["every_position", "last_position"])
def test_a_compiled_step_through_the_models_own_loss_equals_eager(labels_shape):
    """`model(input_ids, labels=...)` compiles whole (the chunked cross-entropy with the seen-item offset): the
    compiled graph keeps the unlabelled rows, which weigh nothing, where eager mode drops them."""
    model = tiny_model("torch", seen_item_bias=True).train()
    input_ids = histories(3)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[labels == 0] = -100
    if labels_shape == "last_position":
        labels = torch.tensor([4, 5, 6])

    def step(module):
        loss = module(input_ids, labels=labels, return_logits=False).loss
        loss.backward()
        gradients = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in module.named_parameters()}
        module.zero_grad()
        return loss.detach(), gradients

    expected_loss, expected = step(model)
    loss, gradients = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert expected["seen_item_offset"] != 0
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=0, atol=1e-5 * gradient.abs().max().item(),
                                   msg=name)


def test_value_checks_raise_in_eager_mode_and_stay_out_of_compiled_graphs():
    model = tiny_model("cpu_fused").eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    input_ids = histories(2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits)
    bad = input_ids.clone()
    bad[1, 2] = NUM_ITEMS + 1
    with pytest.raises(ValueError, match=rf"item id {NUM_ITEMS + 1} at \(row 1, position 2\) is outside "
                                         rf"0..{NUM_ITEMS} \(0 is padding\)"):
        model(bad)


# ------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("kernel_backend, item_representation",
                         [("torch", "id"), ("cpu_fused", "id"), ("torch", "id+text")])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static_batch", "dynamic_batch"])
@torch.no_grad()
def test_exported_scores_equal_eager(kernel_backend, item_representation, dynamic_batch):
    scorer = LastScores(tiny_model(kernel_backend, num_hidden_layers=2,
                                   item_representation=item_representation)).eval()
    input_ids = histories(3)
    dynamic_shapes = {"input_ids": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    program = torch.export.export(scorer, (input_ids,), dynamic_shapes=dynamic_shapes).module()
    torch.testing.assert_close(program(input_ids), scorer(input_ids), rtol=1e-5, atol=1e-5)
    if dynamic_batch:
        others = histories(5, seed=2)
        torch.testing.assert_close(program(others), scorer(others), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_onnx_export_of_the_torch_path_equals_eager(tmp_path):
    """ONNX (torch.onnx.export(dynamo=True)) of the plain-PyTorch path, FFT filter included, run by onnxruntime
    for a batch size other than the example's."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    scorer = LastScores(tiny_model("torch")).eval()
    program = torch.onnx.export(scorer, (histories(3),), dynamo=True, verbose=False,
                                dynamic_shapes={"input_ids": {0: torch.export.Dim("batch")}})
    program.save(tmp_path / "m2rec.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "m2rec.onnx")
    for input_ids in (histories(3), histories(5, seed=2)):
        (scores,) = session.run(None, {session.get_inputs()[0].name: input_ids.numpy()})
        torch.testing.assert_close(torch.from_numpy(scores), scorer(input_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_backend", ["torch", "cpu_fused"])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static_batch", "dynamic_batch"])
@torch.no_grad()
def test_exported_one_event_step_continues_the_cache_as_eager(kernel_backend, dynamic_batch):
    """The cache is an export input (a pytree of its tensors); the program updates it in place as the model does."""
    model = tiny_model(kernel_backend, num_hidden_layers=2).eval()
    step = StepScores(model)

    def cache_and_new_items(batch, seed):
        new_items = torch.randint(1, NUM_ITEMS + 1, (batch, 1), generator=torch.Generator().manual_seed(seed))
        return model(histories(batch, seed=seed), use_cache=True).cache_params, new_items

    cache, new_items = cache_and_new_items(3, seed=3)
    dynamic_shapes = None
    if dynamic_batch:  # every tensor of the cache has the batch first; a cache's spec lists its fields' specs
        batch = torch.export.Dim("batch")
        dynamic_shapes = {"new_items": {0: batch},
                          "cache": torch.utils._pytree.tree_map(lambda _: {0: batch}, _flatten_cache(cache)[0])}
    exported = torch.export.export(step, (new_items, copy.deepcopy(cache)), dynamic_shapes=dynamic_shapes)
    # on the fused path the filter's window sum is the custom op in the program, not its torch twin
    assert ("window_sum" in str(exported.graph)) == (kernel_backend == "cpu_fused")
    program = exported.module()
    if dynamic_batch:
        cache, new_items = cache_and_new_items(5, seed=4)
    eager_cache, exported_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    for _ in range(2):  # the second step reads what the first one wrote
        torch.testing.assert_close(program(new_items, exported_cache), step(new_items, eager_cache),
                                   rtol=1e-5, atol=1e-5)
    for exported, eager in zip(torch.utils._pytree.tree_leaves(exported_cache),
                               torch.utils._pytree.tree_leaves(eager_cache)):
        torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)
    assert exported_cache.num_events.tolist() == (cache.num_events + 2).tolist()
