"""Streaming inference: a user's state carried forward one event at a time (`M2RecCache`) scores exactly as the full
forward on the same history, on the PyTorch path and on the fused CPU kernels."""

import pytest
import torch

from m2rec import M2RecCache, M2RecConfig, M2RecForSequentialRecommendation, kernels, modeling_m2rec

NUM_ITEMS = 30
MAX_LEN = 10

# Every configuration that may carry a state forward (fft_mode "global" may not), each switch on and off.
STREAMING_VARIANTS = [
    dict(fft_mode=fft_mode, fft_adaptive=adaptive, fusion=fusion, selection_source=selection)
    for fft_mode, adaptive in [("causal", True), ("causal", False), ("none", True)]
    for fusion in ["gate", "none"]
    for selection in ["unfiltered", "filtered"]
] + [dict(mixer_residual=False), dict(seen_item_bias=True), dict(item_representation="id+text"),
     dict(fusion="context_gate", fusion_residual=True)]


def variant_id(variant):
    return "-".join(f"{value}" for value in variant.values())


@pytest.fixture(params=["torch", "cpu_fused"])
def backend(request):
    """The `kernel_backend` of the full forward, the cache's fill and the steps (on the CPU the one-event scan and
    convolution are PyTorch either way; the filter's window sum has a fused form)."""
    return request.param


def tiny_model(**overrides):
    torch.manual_seed(0)
    options = dict(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden_size=16, state_size=8, text_embedding_dim=12,
                   num_hidden_layers=2, hidden_dropout_prob=0.0)
    options.update(overrides)
    model = M2RecForSequentialRecommendation(M2RecConfig(**options))
    with torch.no_grad():  # a trained-looking model: every parameter away from its initial value
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    if model.config.fusion != "none":
        text = torch.randn(NUM_ITEMS + 1, options["text_embedding_dim"])
        text[0] = 0
        model.set_text_embeddings(text)
    return model.eval()


def histories(batch, length, seed=1):
    return torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefix_batch(items, lengths):
    """The right-padded batch of each user's first lengths[b] items: items (B, T), lengths (B,) → (B, max length)."""
    width = int(max(lengths))
    kept = torch.arange(width, device=items.device)[None, :] < torch.as_tensor(lengths, device=items.device)[:, None]
    return torch.where(kept, items[:, :width], 0)


def full_scores(model, items, lengths):
    """Next-item scores (B, I) of the full forward on each user's first lengths[b] items."""
    return model(prefix_batch(items, lengths), last_position_only=True).logits


def relative_error(actual, expected):
    """Max-norm relative error of scores, the padding column (the dtype's lowest value) left out."""
    return ((actual[:, 1:] - expected[:, 1:]).abs().max() / expected[:, 1:].abs().max()).item()


@pytest.mark.parametrize("variant", STREAMING_VARIANTS, ids=variant_id)
@torch.no_grad()
def test_streamed_scores_equal_the_full_forward_on_every_prefix(variant, backend):
    """Users of different history lengths are filled from one right-padded batch, then fed one event each per call
    until the longest reaches max_len: at every step the scores are the full forward's on that prefix."""
    model = tiny_model(**variant, kernel_backend=backend)
    items = histories(3, MAX_LEN + 2)
    lengths = torch.tensor([1, 3, 2])  # together they cover every t from 1 to max_len
    out = model(prefix_batch(items, lengths), use_cache=True, last_position_only=True)
    cache = out.cache_params
    assert relative_error(out.logits, full_scores(model, items, lengths)) < 1e-5
    while lengths.max() < MAX_LEN:
        step = model(items[torch.arange(3), lengths][:, None], cache_params=cache, last_position_only=True)
        lengths = lengths + 1
        assert step.cache_params is cache
        assert relative_error(step.logits, full_scores(model, items, lengths)) < 1e-5, f"after {lengths.tolist()}"
    assert cache.num_events.tolist() == lengths.tolist()


@torch.no_grad()
def test_a_new_cache_streams_from_the_first_event(backend):
    """`M2RecCache(config, batch_size)` holds users with no event yet; its first step equals a one-item history."""
    model = tiny_model(kernel_backend=backend)
    items = histories(2, MAX_LEN)
    cache = M2RecCache(model.config, batch_size=2)
    for t in range(MAX_LEN):
        logits = model(items[:, t:t + 1], cache_params=cache).logits  # (B, 1, I)
        assert logits.shape == (2, 1, NUM_ITEMS + 1)
        assert relative_error(logits[:, 0], full_scores(model, items, [t + 1, t + 1])) < 1e-5


@pytest.mark.parametrize("variant", [dict(), dict(fft_mode="none")], ids=["causal", "none"])
@torch.no_grad()
def test_beyond_max_len_the_state_keeps_the_whole_history(variant, backend, monkeypatch):
    """Past max_len events, the SSM state keeps everything and the filter its max_len lags: the scores are the full
    forward's over the whole history with the max_len limit lifted (the batch path instead encodes only the last
    max_len items); the item window holds the last max_len items."""
    model = tiny_model(**variant, kernel_backend=backend)
    length = 2 * MAX_LEN + 3
    items = histories(2, length)
    cache = model(items[:, :MAX_LEN], use_cache=True).cache_params
    monkeypatch.setattr(model.config, "max_len", length)  # the full forward over the whole history
    for t in range(MAX_LEN, length):
        streamed = model(items[:, t:t + 1], cache_params=cache, last_position_only=True).logits
        assert relative_error(streamed, full_scores(model, items, [t + 1, t + 1])) < 1e-5, f"after {t + 1} events"
    assert cache.num_events.tolist() == [length, length]
    assert torch.equal(cache.item_ids, items[:, -MAX_LEN:])


@torch.no_grad()
def test_the_cache_of_a_masked_batch_ignores_the_masked_items(backend):
    """The fill reads each user's last real item from attention_mask, as the forward does, not from the ids."""
    model = tiny_model(kernel_backend=backend)
    items = histories(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = model(items, attention_mask=mask, use_cache=True).cache_params
    padded = model(items * mask, use_cache=True).cache_params
    assert torch.equal(masked.item_ids, padded.item_ids) and masked.num_events.tolist() == [4, 6]
    new_items = histories(2, 1, seed=5)
    expected = model(new_items, cache_params=padded, last_position_only=True).logits
    torch.testing.assert_close(model(new_items, cache_params=masked, last_position_only=True).logits, expected)


@torch.no_grad()
def test_recommend_continues_a_cache():
    """`recommend(new_items, cache_params=cache)` ranks as `recommend` on the whole histories, seen items included."""
    model = tiny_model()
    items = histories(3, 7)
    cache = model(items[:, :-1], use_cache=True).cache_params
    top_items, top_scores = model.recommend(items[:, -1:], cache_params=cache, k=5, exclude_seen=True)
    expected_items, expected_scores = model.recommend(items, k=5, exclude_seen=True)
    assert torch.equal(top_items, expected_items)
    torch.testing.assert_close(top_scores, expected_scores)


@torch.no_grad()
def test_outputs_carry_the_cache():
    model = tiny_model()
    items = histories(2, 4)
    assert model(items).cache_params is None
    loss, logits, user_states, cache = model(items, labels=items[:, 0], use_cache=True, return_dict=False)
    assert isinstance(cache, M2RecCache) and cache.num_events.tolist() == [4, 4]
    assert model.m2rec(items, use_cache=True).cache_params.ssm_states[1].shape == (2, model.config.mixer_size, 8)
    assert cache.selection_conv_states is not None
    assert M2RecCache(tiny_model(selection_source="filtered").config, 2).selection_conv_states is None


def test_the_global_filter_refuses_a_cache():
    model = tiny_model(fft_mode="global")
    items = histories(2, 4)
    with pytest.raises(ValueError, match="fft_mode='global'.*one event at a time"):
        model(items, use_cache=True)
    with pytest.raises(ValueError, match="fft_mode='global'"):
        M2RecCache(model.config, batch_size=2)
    with pytest.raises(ValueError, match="fft_mode='global'"):
        model.recommend(items[:, :1], cache_params=M2RecCache(tiny_model().config, batch_size=2))


def test_a_step_takes_one_event_per_user_of_the_cache():
    model = tiny_model()
    cache = model(histories(2, 4), use_cache=True).cache_params
    with pytest.raises(ValueError, match=r"input_ids must have shape \(2, 1\), got \(2, 3\)"):
        model(histories(2, 3), cache_params=cache)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(2, 1\), got \(3, 1\)"):
        model(histories(3, 1), cache_params=cache)
    with pytest.raises(ValueError, match="only padding"):
        model(torch.tensor([[3], [0]]), cache_params=cache)
    assert cache.num_events.tolist() == [4, 4]  # a refused step leaves the cache as it was


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_streamed_scores_equal_the_full_forward_on_cuda():
    """On CUDA (mamba-ssm's and causal-conv1d's kernels where installed, PyTorch otherwise)."""
    model = tiny_model().cuda()
    items = histories(3, MAX_LEN).cuda()
    lengths = torch.tensor([1, 3, 2], device="cuda")
    cache = model(prefix_batch(items, lengths), use_cache=True).cache_params
    while lengths.max() < MAX_LEN:
        step = model(items[torch.arange(3, device="cuda"), lengths][:, None], cache_params=cache,
                     last_position_only=True)
        lengths = lengths + 1
        assert relative_error(step.logits, full_scores(model, items, lengths)) < 1e-5


@torch.no_grad()
def test_a_step_on_the_torch_path_sums_the_window_in_blocks_of_lags_as_in_one_block(monkeypatch):
    """On the torch path the cached step sums its item window `WINDOW_LAGS_PER_BLOCK` lags at a time: blocks of one
    lag and of three (which leave a short last block) score as one block of all max_len lags, as the fused CPU loop,
    and as the full forward."""
    model = tiny_model(kernel_backend="torch")
    items = histories(5, MAX_LEN)
    expected = full_scores(model, items, [MAX_LEN] * 5)

    def step_scores():
        cache = model(items[:, :-1], use_cache=True).cache_params
        return model(items[:, -1:], cache_params=cache, last_position_only=True).logits

    one_block = step_scores()
    model.config.kernel_backend = "cpu_fused"
    assert relative_error(step_scores(), one_block) < 1e-6
    model.config.kernel_backend = "torch"
    for lags in (1, 3):
        monkeypatch.setattr(kernels, "WINDOW_LAGS_PER_BLOCK", lags)
        blocked = step_scores()
        assert relative_error(blocked, one_block) < 1e-6 and relative_error(blocked, expected) < 1e-5


@torch.no_grad()
def test_a_step_embeds_the_window_where_it_is_when_the_catalogue_is_large(monkeypatch):
    """Past `STEP_CATALOGUE_USERS` users' windows of items, the step embeds its window's positions instead of the
    whole catalogue: the same scores."""
    model = tiny_model()
    items = histories(3, MAX_LEN)
    expected = model(items[:, -1:], cache_params=model(items[:, :-1], use_cache=True).cache_params).logits
    monkeypatch.setattr(modeling_m2rec, "STEP_CATALOGUE_USERS", 0)
    assert model.m2rec._window_rows(items.device) == model.m2rec.embed
    cache = model(items[:, :-1], use_cache=True).cache_params
    assert relative_error(model(items[:, -1:], cache_params=cache).logits[:, 0], expected[:, 0]) < 1e-6


def test_the_embedded_catalogue_is_kept_between_steps_until_its_parameters_change():
    """Cached steps embed the catalogue once, not at every event; an optimizer step, `load_state_dict` and a grown
    catalogue each make the next step embed it again, and a step scores as a fresh model would."""
    model = tiny_model()
    items = histories(2, MAX_LEN)

    def steps(fresh=False):
        if fresh:
            model.m2rec.clear_catalogue_cache()
        with torch.no_grad():
            cache = model(items[:, :-2], use_cache=True).cache_params
            return [model(items[:, t:t + 1], cache_params=cache).logits[:, 0] for t in (MAX_LEN - 2, MAX_LEN - 1)]

    first = steps()
    kept = model.m2rec._catalogue_cache[1]
    assert kept.shape == (NUM_ITEMS + 1, 16)
    second = steps()
    assert model.m2rec._catalogue_cache[1] is kept  # reused, not recomputed
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    model.train()
    with torch.no_grad():
        assert model.m2rec._window_rows(items.device) is not kept  # dropout in training mode: never kept
    model.eval()
    # An optimizer step on the item embeddings writes them in place.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(items, labels=torch.roll(items, -1, dims=1)).loss.backward()
    optimizer.step()
    after = steps()
    assert not torch.allclose(after[0], first[0])
    assert all(torch.equal(a, b) for a, b in zip(after, steps(fresh=True)))
    model.load_state_dict(tiny_model().state_dict())
    assert all(torch.equal(a, b) for a, b in zip(steps(), steps(fresh=True)))
    assert all(torch.equal(a, b) for a, b in zip(steps(), first))
    model.resize_catalogue(NUM_ITEMS + 5)  # a new embedding table
    assert steps()[0].shape == (2, NUM_ITEMS + 6)
