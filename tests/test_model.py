"""Model behaviour on a tiny config: shapes, loss, causality, padding invariance, ablation wiring, bad inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2rec import M2RecConfig, M2RecForSequentialRecommendation, cpu_scan, kernels
from m2rec import modeling_m2rec
from m2rec.cpu_mixer import MixerCPUFn, mixer_forward

NUM_ITEMS = 40
MAX_LEN = 24


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, state_size=8, text_embedding_dim=12,
                   hidden_dropout_prob=0.0)
    options.update(overrides)
    model = M2RecForSequentialRecommendation(M2RecConfig(**options))
    if model.config.fusion != "none":
        text = torch.randn(NUM_ITEMS + 1, options["text_embedding_dim"])
        text[0] = 0
        model.set_text_embeddings(text)
    return model.eval()


def random_histories(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=generator)


# Every configuration that may be trained on all positions (fft_mode "global" may not).
CAUSAL_VARIANTS = [
    dict(),
    dict(selection_source="filtered"),
    dict(fft_adaptive=False),
    dict(fft_mode="none"),
    dict(num_hidden_layers=2),
    dict(mixer_residual=False),
    dict(fusion="context_gate"),
    dict(fusion="sum"),
    dict(fusion="concat"),
    dict(fusion="none"),
]


def test_forward_shapes_loss_and_gradients():
    model = tiny_model().train()
    input_ids = random_histories(3, 10)
    input_ids[0, 6:] = 0
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, 5:] = -100
    out = model(input_ids, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (3, 10, NUM_ITEMS + 1)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert len(out.hidden_states) == 2 + model.config.num_hidden_layers
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert "text_embeddings" not in dict(model.named_parameters())  # frozen buffer


def test_loss_without_logits_matches_and_last_position_logits():
    model = tiny_model()
    input_ids = random_histories(4, 12)
    input_ids[1, 7:] = 0
    next_items = torch.roll(input_ids, -1, dims=1)
    labels = torch.where((input_ids > 0) & (next_items > 0), next_items, torch.full_like(input_ids, -100))
    full = model(input_ids, labels=labels)
    lean = model(input_ids, labels=labels, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    last = model(input_ids, last_position_only=True)  # fuses text at the last positions only
    torch.testing.assert_close(last.logits[1], full.logits[1, 6])
    torch.testing.assert_close(last.logits[0], full.logits[0, 11])
    assert last.last_hidden_state.shape == (4, 1, model.config.hidden_size)
    torch.testing.assert_close(last.last_hidden_state[1, 0], full.last_hidden_state[1, 6])
    last_labels = labels[torch.arange(4), (input_ids > 0).sum(dim=1) - 2]
    torch.testing.assert_close(model(input_ids, labels=last_labels, last_position_only=True).loss,
                               model(input_ids, labels=last_labels).loss)
    assert (full.logits[..., 0] == torch.finfo(full.logits.dtype).min).all()


@pytest.mark.parametrize("overrides", CAUSAL_VARIANTS + [dict(kernel_backend="torch")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_last_position_inference_equals_the_full_forward_there(overrides):
    """With last_position_only the last layer's out_proj, norms, feed-forward and the fusion run at the last real
    positions only: the same scores as the full forward there, up to float32 rounding (a one-row product rounds
    differently from the L-row one), with and without gradient, and with every layer's output asked for."""
    model = tiny_model(**overrides)
    input_ids = random_histories(4, 12)
    input_ids[1, 7:] = 0
    input_ids[2, 1:] = 0
    last = (input_ids > 0).sum(dim=1) - 1
    rows = torch.arange(4)
    with torch.no_grad():
        full = model(input_ids)
        expected, expected_states = full.logits[rows, last], full.last_hidden_state[rows, last]
        lean = model(input_ids, last_position_only=True)
        hidden = model(input_ids, last_position_only=True, output_hidden_states=True)
    for out in (lean, hidden, model(input_ids, last_position_only=True)):  # the last one with gradient
        assert out.logits.shape == (4, NUM_ITEMS + 1) and out.last_hidden_state.shape == (4, 1, 16)
        torch.testing.assert_close(out.logits[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.last_hidden_state[:, 0], expected_states, rtol=1e-5, atol=1e-6)
    assert hidden.hidden_states[-1].shape == (4, 12, 16)  # every layer's output whole
    torch.testing.assert_close(model.next_item_scores(input_ids)[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-6)


def test_last_position_layer_keeps_gradients():
    """A layer's output at given positions differentiates like the full layer's output there (the mixer's fused CPU
    training path included)."""
    model = tiny_model().train()
    layer, selection = model.m2rec.layers[0], torch.randn(3, 10, 16)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    positions = torch.tensor([9, 4, 0])
    cotangent = torch.randn(3, 1, 16)
    full = layer(hidden, selection)[torch.arange(3), positions].unsqueeze(1)
    lean = layer(hidden, selection, output_positions=positions)
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-6)
    expected = torch.autograd.grad(full, [hidden, *layer.parameters()], cotangent)
    for grad, reference in zip(torch.autograd.grad(lean, [hidden, *layer.parameters()], cotangent), expected):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_filter_kernel_is_kept_between_no_grad_calls_until_its_parameter_changes():
    model = tiny_model()
    filter_ = model.m2rec.frequency_filter
    input_ids = random_histories(2, 12)

    def fresh_scores():
        filter_.clear_kernel_cache()
        with torch.no_grad():
            return model(input_ids, last_position_only=True).logits

    with torch.no_grad():
        first = model(input_ids, last_position_only=True).logits
        kept = filter_._kernel_cache
        assert kept is not None
        second = model(input_ids, last_position_only=True).logits
        assert filter_._kernel_cache[1] is kept[1] and filter_._kernel_cache[3] is kept[3]  # reused, not recomputed
    assert torch.equal(first, second)
    # A training step (gradient through W, which is never kept) and the optimizer's in-place update.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids, labels=torch.roll(input_ids, -1, dims=1)).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after_step = model(input_ids, last_position_only=True).logits
    assert not torch.allclose(after_step, first)
    assert torch.equal(after_step, fresh_scores())
    # load_state_dict writes W in place.
    state = {name: value.clone() for name, value in tiny_model(seed=3).state_dict().items()}
    with torch.no_grad():
        model(input_ids, last_position_only=True)
    model.load_state_dict(state)
    with torch.no_grad():
        loaded = model(input_ids, last_position_only=True).logits
    assert torch.equal(loaded, fresh_scores())
    # Another length gets its own spectrum; a new dtype its own kernel.
    with torch.no_grad():
        model(input_ids[:, :5])
        torch.testing.assert_close(model(input_ids, last_position_only=True).logits, loaded)
        double = model.double()(input_ids, last_position_only=True).logits
    torch.testing.assert_close(double.float()[:, 1:], loaded[:, 1:], rtol=1e-5, atol=1e-6)
    # Documented as not detected: a write through .data, which autograd does not see either.
    model.float()
    with torch.no_grad():
        before = model(input_ids, last_position_only=True).logits
        filter_.frequency_response.data.mul_(2.0)
        assert torch.equal(model(input_ids, last_position_only=True).logits, before)
    assert not torch.allclose(fresh_scores(), before)


def test_filter_spectrum_is_made_for_the_ffts_only_and_outlives_a_cached_step(monkeypatch):
    """The kernel's spectrum is computed where the FFTs read it, not for the fused direct sum; and a cached step,
    which reads the kernel alone, leaves it kept for the next re-encode (it was recomputed after every step)."""
    model = tiny_model()
    input_ids = random_histories(2, 12)
    transforms = []
    spectrum = modeling_m2rec.causal_fft_kernel_spectrum
    monkeypatch.setattr(modeling_m2rec, "causal_fft_kernel_spectrum", lambda *args: transforms.append(1) or spectrum(*args))
    with torch.no_grad():
        model.config.kernel_backend = "cpu_fused"
        direct = model(input_ids, last_position_only=True).logits
        assert transforms == []
        model.config.kernel_backend = "torch"
        cache = model(input_ids, use_cache=True).cache_params
        model(input_ids[:, :1], cache_params=cache)
        torch.testing.assert_close(model(input_ids, last_position_only=True).logits, direct, rtol=1e-5, atol=1e-5)
    assert transforms == [1]


@pytest.mark.parametrize("fusion", ["gate", "context_gate", "sum", "concat"])
def test_residual_fusion_adds_the_sequence_features_to_the_papers_fusion(fusion):
    paper = modeling_m2rec.M2RecFusion(M2RecConfig(num_items=NUM_ITEMS, hidden_size=8, fusion=fusion))
    residual = modeling_m2rec.M2RecFusion(M2RecConfig(num_items=NUM_ITEMS, hidden_size=8, fusion=fusion,
                                                      fusion_residual=True))
    residual.load_state_dict(paper.state_dict())  # the switch adds no parameter
    text_features, sequence_features = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(residual(text_features, sequence_features),
                               sequence_features + paper(text_features, sequence_features))
    # Without text there is no fusion: the switch changes nothing, so a config that sets it runs the ablation.
    torch.manual_seed(0)
    no_text = M2RecForSequentialRecommendation(M2RecConfig(num_items=NUM_ITEMS, hidden_size=8, fusion="none",
                                                           fusion_residual=True))
    torch.manual_seed(0)
    plain = M2RecForSequentialRecommendation(M2RecConfig(num_items=NUM_ITEMS, hidden_size=8, fusion="none"))
    input_ids = random_histories(2, 6)
    torch.testing.assert_close(no_text.eval()(input_ids).logits, plain.eval()(input_ids).logits)


def test_loss_excluding_history_leaves_each_positions_seen_items_out_of_the_softmax():
    """The training loss with `loss_excludes_history` equals cross-entropy on the logits with the items each
    position has seen (but not its target) at -inf; scores are untouched; the combinations it refuses say why."""
    model = tiny_model(loss_excludes_history=True).train()
    input_ids = random_histories(3, 12)
    input_ids[1, 7:] = 0
    input_ids[0, 6] = input_ids[0, 2]  # a revisit: position 5's target was seen at position 2
    next_items = torch.roll(input_ids, -1, dims=1)
    labels = torch.where((input_ids > 0) & (next_items > 0), next_items, torch.full_like(input_ids, -100))
    torch.manual_seed(0)
    out = model(input_ids, labels=labels)
    masked = out.logits.clone()
    for b, t in (labels != -100).nonzero().tolist():
        for item in set(input_ids[b, : t + 1].tolist()) - {labels[b, t].item()}:
            masked[b, t, item] = float("-inf")
    expected = F.cross_entropy(masked[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss, expected)
    plain = F.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    assert out.loss < plain  # the seen items took probability in the plain loss
    for options in (dict(seen_item_bias=True), dict(loss="sampled_softmax")):
        with pytest.raises(ValueError, match="loss_excludes_history"):
            M2RecConfig(num_items=NUM_ITEMS, loss_excludes_history=True, **options)


def test_seen_item_bias_offsets_the_items_each_position_has_seen():
    plain = tiny_model()
    model = tiny_model(seen_item_bias=True)
    with torch.no_grad():
        model.seen_item_offset.fill_(-2.0)
    input_ids = random_histories(3, 12)
    input_ids[1, 7:] = 0
    input_ids[0, 5] = input_ids[0, 2]  # a repeat: seen from position 2 on
    logits, plain_logits = model(input_ids).logits, plain(input_ids).logits
    for b, t in [(0, 1), (0, 2), (0, 5), (1, 6), (2, 11)]:
        seen = set(input_ids[b, : t + 1].tolist())
        offsets = logits[b, t, 1:] - plain_logits[b, t, 1:]
        expected = torch.tensor([-2.0 if item in seen else 0.0 for item in range(1, NUM_ITEMS + 1)])
        torch.testing.assert_close(offsets, expected, rtol=0, atol=1e-5)
    last = model(input_ids, last_position_only=True).logits  # (B, I): every input is seen
    torch.testing.assert_close(last[1], logits[1, 6])
    torch.testing.assert_close(last[2], logits[2, 11])

    # The chunked loss equals cross-entropy on the full logits, every position and last position, with gradients.
    model.train()
    next_items = torch.roll(input_ids, -1, dims=1)
    labels = torch.where((input_ids > 0) & (next_items > 0), next_items, torch.full_like(input_ids, -100))
    out = model(input_ids, labels=labels)
    expected = F.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss, expected)
    lean = model(input_ids, labels=labels, return_logits=False).loss
    torch.testing.assert_close(lean, expected)
    (offset_grad,) = torch.autograd.grad(lean, model.seen_item_offset)
    assert offset_grad != 0
    last_labels = torch.tensor([3, 4, 5])
    torch.testing.assert_close(model(input_ids, labels=last_labels, last_position_only=True).loss,
                               F.cross_entropy(last, last_labels))

    # Causal: later items never change an earlier position's offsets.
    changed = input_ids.clone()
    changed[:, 4:] = random_histories(3, 8, seed=9)
    torch.testing.assert_close(model(changed).logits[:, :4], logits[:, :4], rtol=0, atol=1e-5)


def test_bad_labels_are_refused():
    model = tiny_model()
    input_ids = random_histories(2, 5)
    labels = torch.full_like(input_ids, -100)
    labels[1, 3] = NUM_ITEMS + 1
    with pytest.raises(ValueError, match=f"label {NUM_ITEMS + 1} at \\(1, 3\\)"):
        model(input_ids, labels=labels)
    with pytest.raises(ValueError, match="label 0"):
        model(input_ids, labels=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("overrides", CAUSAL_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_no_position_sees_later_items(overrides):
    model = tiny_model(**overrides)
    input_ids = random_histories(2, MAX_LEN)
    out = model(input_ids, output_hidden_states=True)
    for t in (0, 5, MAX_LEN - 2):
        changed = input_ids.clone()
        changed[:, t + 1:] = random_histories(2, MAX_LEN - t - 1, seed=t + 7)
        assert not torch.equal(changed, input_ids)
        out_changed = model(changed, output_hidden_states=True)
        torch.testing.assert_close(out_changed.logits[:, : t + 1], out.logits[:, : t + 1], rtol=0, atol=1e-5)
        for hidden, hidden_changed in zip(out.hidden_states, out_changed.hidden_states):
            torch.testing.assert_close(hidden_changed[:, : t + 1], hidden[:, : t + 1], rtol=0, atol=1e-5)


def test_global_filter_leaks_and_refuses_all_position_training():
    model = tiny_model(fft_mode="global")
    input_ids = random_histories(2, MAX_LEN)
    changed = input_ids.clone()
    changed[:, 10:] = random_histories(2, MAX_LEN - 10, seed=5)
    # The circular filter shows position 3 the items after it: this is why all-position training is refused.
    assert not torch.allclose(model(changed).logits[:, 3], model(input_ids).logits[:, 3])
    with pytest.raises(ValueError, match="fft_mode='global'"):
        model(input_ids, labels=torch.roll(input_ids, -1, dims=1))
    last_item_labels = random_histories(1, 2, seed=3)[0]
    assert torch.isfinite(model(input_ids, labels=last_item_labels).loss)


@pytest.mark.parametrize("fft_mode", ["causal", "global"])
@pytest.mark.parametrize("fft_adaptive", [True, False])
def test_frequency_filter_is_its_definition(fft_mode, fft_adaptive):
    """The filter against its definition in float64 numpy: the causal one a direct convolution with the causal half
    of F⁻¹(W ⊙ M) over n = 2·max_len, the global one the circular filter over max_len."""
    frequency_filter = tiny_model(fft_mode=fft_mode, fft_adaptive=fft_adaptive).m2rec.frequency_filter
    if fft_adaptive:  # a response far from its all-pass init
        torch.nn.init.normal_(frequency_filter.frequency_response)
    length = MAX_LEN - 5
    x = torch.randn(3, length, 16, generator=torch.Generator().manual_seed(2))
    response = frequency_filter.masked_response("cpu").detach().numpy().astype(np.complex128)  # (F, D) or (F, 1)
    x64 = x.double().numpy()
    if fft_mode == "causal":
        kernel = np.fft.irfft(response, n=2 * MAX_LEN, axis=0)[:length]  # (L, D): lags 0..L-1
        expected = np.zeros_like(x64)
        for t in range(length):
            for lag in range(t + 1):
                expected[:, t] += kernel[lag] * x64[:, t - lag]
    else:
        expected = np.fft.irfft(np.fft.rfft(x64, n=MAX_LEN, axis=1) * response, n=MAX_LEN, axis=1)[:, :length]
    with torch.no_grad():
        filtered = frequency_filter.filter(x)
    torch.testing.assert_close(filtered.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def parameter_gradients(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("selection_source", ["unfiltered", "filtered"])
@pytest.mark.parametrize("backward_chunk", [1024, 8])
def test_fused_cpu_training_mixer_equals_its_composition(monkeypatch, scan_variant, selection_source, backward_chunk):
    """A training step goes through MixerCPUFn (which recomputes in the backward what the composition keeps) and
    gives the composition's loss and gradients, with the scan's backward in one time chunk or several."""
    monkeypatch.setattr(cpu_scan, "BACKWARD_CHUNK", backward_chunk)
    model = tiny_model(selection_source=selection_source, num_hidden_layers=2).train()
    with torch.no_grad():  # away from the initialisation, where several gradients are exactly zero
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    input_ids = random_histories(3, 20)
    input_ids[0, 13:] = 0
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[labels == 0] = -100
    fused_calls = []
    apply = MixerCPUFn.apply
    monkeypatch.setattr(MixerCPUFn, "apply", lambda *args: fused_calls.append(1) or apply(*args))
    fused = parameter_gradients(model, input_ids, labels)
    assert len(fused_calls) == 2  # one per layer
    for layer in model.m2rec.layers:
        monkeypatch.setattr(layer.mixer, "forward", layer.mixer.compose)
    composed = parameter_gradients(model, input_ids, labels)
    assert len(fused_calls) == 2
    for name, expected in composed.items():
        torch.testing.assert_close(fused[name], expected, rtol=0, atol=1e-5 * expected.abs().max().item(), msg=name)


def test_mixer_composes_its_kernels_outside_the_fused_cpu_path():
    model = tiny_model()
    mixer, hidden_states = model.m2rec.layers[0].mixer, torch.randn(2, 5, 16)
    weights = mixer._fused_cpu_weights(hidden_states, "cpu_fused")
    # every parameter, each once: the fused path takes all of them, and its dtype and device checks see all of them
    assert sorted(map(id, weights)) == sorted(map(id, mixer.parameters()))
    with torch.no_grad():  # inference takes mixer_forward
        assert mixer._fused_cpu_weights(hidden_states, "cpu_fused")
    assert not mixer._fused_cpu_weights(hidden_states, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mixer._fused_cpu_weights(hidden_states, "cpu_fused")
    assert not mixer._fused_cpu_weights(hidden_states.double(), "cpu_fused")


@pytest.mark.parametrize("selection_source", ["unfiltered", "filtered"])
def test_fused_cpu_inference_mixer_equals_its_composition(monkeypatch, scan_variant, selection_source):
    """Without gradient the mixer runs `mixer_forward` on the fused CPU kernels: the composition's output at every
    position, and at one position per sequence."""
    model = tiny_model(selection_source=selection_source).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    mixer = model.m2rec.layers[0].mixer
    hidden_states, selection_states = torch.randn(3, 20, 16), torch.randn(3, 20, 16)
    selection_states = selection_states if selection_source == "unfiltered" else None
    positions = torch.tensor([19, 0, 7])
    calls = []
    monkeypatch.setattr(modeling_m2rec, "mixer_forward",
                        lambda *args: calls.append(1) or mixer_forward(*args))
    with torch.no_grad():
        for output_positions in (None, positions):
            fused = mixer(hidden_states, selection_states, output_positions=output_positions)
            composed = mixer.compose(hidden_states, selection_states, backend="cpu_fused",
                                     output_positions=output_positions)
            assert fused.shape == composed.shape
            torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    full = mixer(hidden_states, selection_states).detach()
    torch.testing.assert_close(fused[:, 0], full[torch.arange(3), positions], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fft_mode", ["causal", "global", "none"])
def test_padding_invariance(fft_mode):
    model = tiny_model(fft_mode=fft_mode)
    short = random_histories(1, 7, seed=11)
    alone = model(short, last_position_only=True).logits
    batch = random_histories(3, 20, seed=12)
    batch[1] = 0
    batch[1, :7] = short[0]
    batched = model(batch, last_position_only=True).logits
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-5, atol=1e-5)


def test_ablation_switches_change_parameters_and_outputs():
    def parameter_names(model):
        return {name for name, _ in model.named_parameters()}

    full = tiny_model()
    assert "m2rec.frequency_filter.frequency_response" in parameter_names(full)
    assert {"m2rec.fusion.text_weight", "m2rec.fusion.sequence_weight"} <= parameter_names(full)
    assert not any("frequency_response" in n for n in parameter_names(tiny_model(fft_adaptive=False)))
    assert tiny_model(fft_mode="none").m2rec.frequency_filter is None
    without_text = tiny_model(fusion="none")
    assert not hasattr(without_text.m2rec, "text_embeddings")
    assert "m2rec.fusion.gate_proj.weight" in parameter_names(tiny_model(fusion="context_gate"))
    assert tiny_model(fusion="concat").m2rec.fusion.out_proj.in_features == 32

    input_ids = random_histories(2, 10)
    with torch.no_grad():
        full.m2rec.fusion.text_weight.fill_(0.3)  # α = β = 1 at init would make the gate equal to "sum"
    reference = full(input_ids).logits
    # Same seed, same weights where shapes agree: each switch must reach the forward path.
    for overrides in (dict(selection_source="filtered"), dict(fft_mode="none"), dict(fusion="sum"),
                      dict(mixer_residual=False)):
        assert not torch.allclose(tiny_model(**overrides)(input_ids).logits, reference), overrides


@pytest.mark.parametrize("mixer_residual", [True, False])
def test_mixer_residual_is_the_only_path_around_the_mixer(mixer_residual):
    # With the mixer silenced, a layer without the residual forgets which item sits at each position; with it, the
    # item's own embedding passes straight through (the path by which the last item scores itself).
    layer = tiny_model(mixer_residual=mixer_residual).m2rec.layers[0]
    with torch.no_grad():
        layer.mixer.out_proj.weight.zero_()
    hidden_states = torch.randn(2, 10, 16)
    outputs = layer(hidden_states)
    same_everywhere = torch.allclose(outputs, outputs[:1, :1].expand_as(outputs))
    assert same_everywhere != mixer_residual


def test_text_embeddings_change_scores_and_can_grow():
    model = tiny_model()
    input_ids = random_histories(2, 8)
    before = model(input_ids).logits
    new_text = torch.randn(NUM_ITEMS + 1, 12)
    new_text[0] = 0
    model.set_text_embeddings(new_text)
    assert not torch.allclose(model(input_ids).logits, before)

    grown = torch.cat([new_text, torch.randn(5, 12)])
    model.set_text_embeddings(grown)
    assert model.config.num_items == NUM_ITEMS + 5
    assert model.item_scorer.weight is model.m2rec.item_embeddings.weight
    assert model(torch.tensor([[NUM_ITEMS + 5, 1]])).logits.shape == (1, 2, NUM_ITEMS + 6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(NUM_ITEMS, 12), "rows"),
        (torch.randn(NUM_ITEMS + 1, 11), "shape"),
        (torch.full((NUM_ITEMS + 1, 12), float("nan")), "non-finite"),
        (torch.ones(NUM_ITEMS + 1, 12), "padding"),
        (torch.ones(NUM_ITEMS + 1, 12, dtype=torch.long), "floating"),
    ],
)
def test_bad_text_embeddings_are_refused(bad, message):
    model = tiny_model()
    kept = model.m2rec.text_embeddings.clone()
    if message == "non-finite":
        bad[0] = 0
    with pytest.raises(ValueError, match=message):
        model.set_text_embeddings(bad)
    assert torch.equal(model.m2rec.text_embeddings, kept)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.tensor([[1, 2, NUM_ITEMS + 1]]), f"item id {NUM_ITEMS + 1} at \\(row 0, position 2\\)"),
        (torch.tensor([[1, -3, 0]]), "item id -3"),
        (torch.tensor([[1, 2], [0, 0]]), "rows \\[1\\] contain only padding"),
        (torch.tensor([[1, 0, 2]]), "not right-padded"),
        (torch.tensor([[0, 0, 2]]), "row 0 is not right-padded"),
        (torch.tensor([[3, 1], [2, 0], [0, 0], [0, 0]]), "rows \\[2, 3\\] contain only padding"),
        (torch.zeros(2, 0, dtype=torch.long), "rows \\[0, 1\\] contain only padding"),
        (torch.ones(1, MAX_LEN + 1, dtype=torch.long), f"max_len is {MAX_LEN}"),
        (torch.ones(5, dtype=torch.long), "shape"),
        (torch.zeros(0, 4, dtype=torch.long), "input_ids has shape \\(0, 4\\): the batch holds no sequence"),
    ],
)
def test_bad_inputs_are_refused(input_ids, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(input_ids)
    with pytest.raises(ValueError, match=message):
        model.recommend(input_ids, k=3)


def test_recommend_ranks_best_first_without_padding_or_seen_items():
    model = tiny_model()
    input_ids = random_histories(3, 6)
    input_ids[2, 3:] = 0
    items, scores = model.recommend(input_ids, k=NUM_ITEMS - 6)
    assert items.shape == (3, NUM_ITEMS - 6)
    assert (items > 0).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    expected = model(input_ids, last_position_only=True).logits.topk(5).indices
    assert torch.equal(items[:, :5], expected)

    unseen, _ = model.recommend(input_ids, k=NUM_ITEMS - 6, exclude_seen=True)
    for row in range(3):
        history = set(input_ids[row][input_ids[row] > 0].tolist())
        assert not history & set(unseen[row].tolist())
    everything, _ = model.recommend(input_ids, k=NUM_ITEMS, exclude_seen=True)
    assert (everything > 0).all() and all(len(set(r.tolist())) == NUM_ITEMS for r in everything)
    with pytest.raises(ValueError, match="k must be"):
        model.recommend(input_ids, k=NUM_ITEMS + 1)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="fusion='attention' is not supported"):
        M2RecConfig(fusion="attention")
    with pytest.raises(ValueError, match="fft_cut_ratio"):
        M2RecConfig(fft_cut_ratio=1.0)
    with pytest.raises(ValueError, match="kernel_backend='triton' is not supported"):
        M2RecConfig(kernel_backend="triton")


def test_kernel_backend_of_the_config_chooses_the_kernels(monkeypatch):
    """`config.kernel_backend` picks the kernels of every layer, read at each call (a loaded model can switch), and
    both CPU paths give the same scores."""
    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)
    calls = []
    for name in ("selective_scan_cpu", "selective_scan_torch", "causal_conv1d_cpu", "causal_conv1d_torch"):
        function = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=function, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = tiny_model(kernel_backend="torch", num_hidden_layers=2)
    input_ids = random_histories(2, 9)
    with torch.no_grad():
        plain = model(input_ids).logits
        # per layer: two convolutions (the scanned and the selection stream), one scan
        assert sorted(set(calls)) == ["causal_conv1d_torch", "selective_scan_torch"] and len(calls) == 6
        calls.clear()
        model.config.kernel_backend = "cpu_fused"
        monkeypatch.setattr(modeling_m2rec, "mixer_forward",
                            lambda *a: calls.append("mixer_forward") or mixer_forward(*a))
        fused = model(input_ids).logits
    # without gradient each layer's mixer is one call of the fused kernels' mixer_forward
    assert calls == ["mixer_forward"] * 2
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    calls.clear()
    model(input_ids).logits.sum().backward()  # with gradient, MixerCPUFn, which calls the extension directly
    assert calls == []
    model.config.kernel_backend = "torch"
    model(input_ids).logits.sum().backward()
    assert sorted(set(calls)) == ["causal_conv1d_torch", "selective_scan_torch"] and len(calls) == 6


def test_weight_decay_marks():
    mixer = tiny_model().m2rec.layers[0].mixer
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_weight_decay
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1, 9, dtype=torch.float32))


def test_offloaded_weights_are_loaded_by_their_modules(monkeypatch):
    """accelerate's CPU offload keeps every weight on the meta device and loads it only while its own module runs:
    the mixer uses its weights through its submodules, so the offloaded model scores (and streams) as before."""
    from accelerate import cpu_offload

    from m2rec import M2RecCache

    monkeypatch.setattr(cpu_scan, "FUSED_CPU_DISABLED", False)
    model = tiny_model(num_hidden_layers=2)
    input_ids, new_items = random_histories(2, 9), random_histories(2, 1, seed=5)
    with torch.no_grad():
        expected = model(input_ids).logits
        expected_step = model(new_items, cache_params=model(input_ids, use_cache=True).cache_params).logits
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.m2rec.layers[0].mixer.in_proj.weight.device.type == "meta"
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=0)
        cache = model(input_ids, use_cache=True).cache_params
        assert isinstance(cache, M2RecCache)
        torch.testing.assert_close(model(new_items, cache_params=cache).logits, expected_step, rtol=0, atol=0)
    # MixerCPUFn takes every weight at once: with offloaded weights the mixer composes its submodules instead.
    assert not model.m2rec.layers[0].mixer._fused_cpu_weights(torch.randn(2, 5, 16), "cpu_fused")


@pytest.mark.parametrize("sampler, sharing", [("uniform", "batch"), ("popularity", "batch"), ("in_batch", "batch"),
                                              ("mixed", "batch"), ("uniform", "sequence"), ("popularity", "sequence")])
@pytest.mark.parametrize("seen_item_bias", [False, True], ids=["plain", "seen_offset"])
def test_sampled_softmax_trains_every_parameter_and_approaches_the_full_loss(sampler, sharing, seen_item_bias):
    """loss="sampled_softmax": every parameter (the seen-item offset too) gets a gradient, and with many uniform or
    popularity draws, shared by the batch or one per sequence, the loss of the same weights is the full softmax's
    (the logQ-corrected estimate converges)."""
    model = tiny_model(seen_item_bias=seen_item_bias, loss="sampled_softmax", negative_sampler=sampler,
                       num_negatives=8, negative_sharing=sharing).train()
    with torch.no_grad():
        if seen_item_bias:
            model.seen_item_offset.fill_(-0.7)
    model.set_item_counts(torch.arange(NUM_ITEMS + 1))
    input_ids = random_histories(3, 10)
    input_ids[0, 6:] = 0
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, 5:] = -100
    torch.manual_seed(0)
    model(input_ids, labels=labels, return_logits=False).loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    if sampler in ("uniform", "popularity"):
        model.eval()
        full = M2RecForSequentialRecommendation(M2RecConfig(**{**model.config.to_dict(), "loss": "full_softmax"}))
        full.load_state_dict(model.state_dict())
        expected = full.eval()(input_ids, labels=labels).loss
        model.config.num_negatives = 200_000
        torch.testing.assert_close(model(input_ids, labels=labels).loss, expected, rtol=5e-3, atol=0)


def test_loss_settings_are_checked():
    with pytest.raises(ValueError, match="loss='sampled' is not supported; choose one of"):
        M2RecConfig(loss="sampled")
    with pytest.raises(ValueError, match="negative_sampler='random' is not supported"):
        M2RecConfig(negative_sampler="random")
    with pytest.raises(ValueError, match="num_negatives must be a positive integer, got 0"):
        M2RecConfig(num_negatives=0)
    with pytest.raises(ValueError, match="negative_sharing='sequence' draws each sequence's own negatives"):
        M2RecConfig(negative_sharing="sequence", negative_sampler="in_batch")
    with pytest.raises(ValueError, match="negative_sharing='row' is not supported"):
        M2RecConfig(negative_sharing="row")
    model = tiny_model(loss="sampled_softmax", negative_sampler="popularity")
    input_ids = random_histories(2, 5)
    with pytest.raises(ValueError, match="set_item_counts"):
        model(input_ids, labels=torch.roll(input_ids, -1, dims=1))
    with pytest.raises(ValueError, match=r"item_counts must have shape \(41,\).*got \(40,\)"):
        model.set_item_counts(torch.ones(NUM_ITEMS))
    with pytest.raises(ValueError, match=r"item_counts\[3\] = -1.0"):
        model.set_item_counts(torch.tensor([0.0, 1, 2, -1] + [1.0] * (NUM_ITEMS - 3)))


def test_text_dropout_drops_the_text_features_in_training_only():
    """`text_dropout_prob` (off by default, as in the paper) drops entries of the projected text features in training
    mode and scales the rest; in eval mode the features, and so the scores, are those of a model without it."""
    model = tiny_model(text_dropout_prob=0.5)
    plain = tiny_model()
    input_ids = random_histories(3, 12)
    with torch.no_grad():
        expected = plain.m2rec.text_features(input_ids)
        torch.testing.assert_close(model.m2rec.text_features(input_ids), expected)
        torch.testing.assert_close(model(input_ids).logits, plain(input_ids).logits)
        model.train()
        dropped = model.m2rec.text_features(input_ids)
    zeros = dropped == 0
    assert 0.3 < zeros.float().mean().item() < 0.7
    torch.testing.assert_close(dropped[~zeros], 2 * expected[~zeros])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="text_dropout_prob must be in"):
            M2RecConfig(num_items=5, text_dropout_prob=bad)
