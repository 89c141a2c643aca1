"""The scoring API: next-item scores over the catalogue or candidates, recommend's options, and user/item embeddings
whose inner products are the scores, round-tripped through an inner-product index."""

import pytest
import torch

from m2rec import kernels
from m2rec.training.metrics import rank_targets
from test_model import MAX_LEN, NUM_ITEMS, random_histories, tiny_model


def model_with_offset(offset):
    model = tiny_model(seen_item_bias=True)
    with torch.no_grad():
        model.seen_item_offset.fill_(offset)
    return model


@torch.no_grad()
def test_scores_over_the_catalogue_and_over_candidates():
    model = tiny_model()
    input_ids = random_histories(3, 7)
    input_ids[1, 4:] = 0
    all_scores = model.next_item_scores(input_ids)  # (B, I)
    torch.testing.assert_close(all_scores, model(input_ids, last_position_only=True).logits, rtol=0, atol=0)
    shared = torch.tensor([5, 17, 3, 40])
    torch.testing.assert_close(model.next_item_scores(input_ids, candidates=shared), all_scores[:, shared])
    per_user = torch.tensor([[1, 2], [9, 30], [40, 40]])
    torch.testing.assert_close(model.next_item_scores(input_ids, candidates=per_user), all_scores.gather(1, per_user))
    for bad in (torch.tensor([3, 0]), torch.tensor([NUM_ITEMS + 1])):
        with pytest.raises(ValueError, match=f"candidates holds {bad[-1].item()}, which is not an item id"):
            model.next_item_scores(input_ids, candidates=bad)


@torch.no_grad()
def test_recommend_among_candidates_and_without_excluded_ids():
    model = tiny_model()
    input_ids = random_histories(2, 5)
    candidates = torch.tensor([[4, 8, 15, 16, 23, 42 - 2], [1, 2, 3, 4, 5, 6]])
    items, scores = model.recommend(input_ids, k=3, candidates=candidates)
    candidate_scores = model.next_item_scores(input_ids, candidates=candidates)
    top_scores, top_columns = candidate_scores.topk(3)
    assert torch.equal(items, candidates.gather(1, top_columns))
    torch.testing.assert_close(scores, top_scores)

    best = model.recommend(input_ids, k=1)[0]  # (B, 1)
    without_best, _ = model.recommend(input_ids, k=NUM_ITEMS - 1, exclude_ids=torch.cat([best, best * 0], dim=1))
    assert not (without_best == best).any()  # each row's own excluded item; 0 is padding
    assert model.recommend(input_ids, k=2, exclude_ids=best[0])[0].ne(best[0]).all()  # (E,) for every row
    with pytest.raises(ValueError, match="k must be between 1 and 6"):
        model.recommend(input_ids, k=7, candidates=candidates)
    with pytest.raises(ValueError, match="exclude_ids holds -1"):
        model.recommend(input_ids, exclude_ids=torch.tensor([-1]))
    with pytest.raises(ValueError, match="candidates has 3 rows for 2 histories"):
        model.recommend(input_ids, k=2, candidates=torch.ones(3, 4, dtype=torch.long))


@torch.no_grad()
def test_exclude_seen_is_evaluations_exclude_history():
    """A target's position in recommend(exclude_seen=True) is its rank under evaluation's exclude_history when the
    input is the whole history; a history longer than max_len needs the rest passed as exclude_ids."""
    model = tiny_model()
    histories = random_histories(4, MAX_LEN)
    histories[1, 10:] = 0
    long_history = torch.cat([torch.arange(1, 9)[None].expand(4, -1), histories], dim=1)  # (4, 8 + MAX_LEN)
    targets = torch.tensor([next(item for item in range(NUM_ITEMS, 0, -1) if item not in row) for row in long_history])
    ranked, _ = model.recommend(histories, k=NUM_ITEMS, exclude_seen=True)
    positions = (ranked == targets[:, None]).float().argmax(dim=1)
    scores = model.next_item_scores(histories).float()
    assert torch.equal(positions, rank_targets(scores, targets, histories))

    # Truncation: the input keeps the last max_len of a longer history; its older items are only excluded if given.
    ranked, _ = model.recommend(histories, k=NUM_ITEMS, exclude_seen=True, exclude_ids=long_history)
    positions = (ranked == targets[:, None]).float().argmax(dim=1)
    assert torch.equal(positions, rank_targets(scores, targets, long_history))
    num_unseen = NUM_ITEMS - len(set(histories[0].tolist()))
    only_input, _ = model.recommend(histories[:1], k=num_unseen, exclude_seen=True)
    older = set(range(1, 9)) - set(histories[0].tolist())
    assert older and older <= set(only_input[0].tolist())  # exclude_seen alone keeps the older items ranked


def inner_product_search(user_vectors, item_vectors, k):
    """Rows of the k largest inner products, through faiss when installed (the `ann` extra), else exact torch top-k
    standing in for an index."""
    try:
        import faiss
    except ImportError:
        return (user_vectors @ item_vectors.T).topk(k, dim=1).indices
    index = faiss.IndexFlatIP(item_vectors.shape[1])
    index.add(item_vectors.numpy())
    return torch.from_numpy(index.search(user_vectors.numpy(), k)[1])


@pytest.mark.parametrize("offset", [None, -1.5, 1.5])
@torch.no_grad()
def test_embeddings_give_the_scores_and_round_trip_through_an_index(offset):
    model = tiny_model() if offset is None else model_with_offset(offset)
    input_ids = random_histories(3, 8)
    input_ids[2, 5:] = 0
    users, items = model.user_embeddings(input_ids), model.item_embeddings()  # (B, D), (num_items, D)
    assert users.shape == (3, 16) and items.shape == (NUM_ITEMS, 16)
    scores = model.next_item_scores(input_ids)[:, 1:]  # (B, num_items): column r is item r + 1
    seen = torch.zeros(3, NUM_ITEMS + 1).scatter_(1, input_ids, 1.0)[:, 1:]  # (B, num_items): 1 on history items
    # The user vector alone gives the scores without the seen-item offset; the offset adds to the seen items only.
    torch.testing.assert_close(users @ items.T + seen * (offset or 0.0), scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.item_embeddings(torch.tensor([3, 1])), items[[2, 0]], rtol=0, atol=0)

    k = 5
    retrieved = inner_product_search(users, items, k + input_ids.shape[1]) + 1  # rows → item ids
    for exclude_seen in (False, True):
        if offset is not None and offset > 0 and not exclude_seen:
            continue  # a positive offset can lift a seen item from outside the retrieved set (documented)
        expected = model.recommend(input_ids, k=k, exclude_seen=exclude_seen)
        through_index = model.recommend(input_ids, k=k, exclude_seen=exclude_seen, candidates=retrieved)
        assert torch.equal(through_index[0], expected[0])
        torch.testing.assert_close(through_index[1], expected[1])


@pytest.mark.parametrize("seen_item_bias", [False, True], ids=["plain", "seen_offset"])
def test_large_catalogues_are_ranked_in_chunks_with_the_same_result(monkeypatch, seen_item_bias):
    """Above TOP_K_CHUNK_ITEMS items (lowered here to 16, so the 41-row catalogue is 3 chunks), `recommend` ranks
    in chunks with the bfloat16 pre-selection where the CPU has it: the same items and scores as the one-matrix
    ranking, with exclude_seen, exclude_ids, the seen-item offset and a cache."""
    from m2rec import modeling_m2rec

    model = tiny_model(seen_item_bias=seen_item_bias)
    if seen_item_bias:
        with torch.no_grad():
            model.seen_item_offset.fill_(-0.4)
    histories = random_histories(5, 9)
    histories[1, 4:] = 0
    exclude_ids = torch.tensor([3, 7, 0, 12])
    calls = []
    monkeypatch.setattr(modeling_m2rec, "top_k_items", lambda *a, **kw: calls.append(kw) or kernels.top_k_items(*a, **kw))
    for options in (dict(k=10), dict(k=5, exclude_seen=True, exclude_ids=exclude_ids), dict(k=NUM_ITEMS)):
        expected_items, expected_scores = model.recommend(histories, **options)
        monkeypatch.setattr(modeling_m2rec, "TOP_K_CHUNK_ITEMS", 16)
        items, scores = model.recommend(histories, **options)
        monkeypatch.setattr(modeling_m2rec, "TOP_K_CHUNK_ITEMS", 1 << 16)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
        assert items.tolist() == expected_items.tolist()
    assert len(calls) == 3 and calls[0]["chunk_size"] == 16
    assert calls[0]["bf16"] == kernels.bf16_scoring_supported("cpu")
    new_items = random_histories(5, 1, seed=2)
    expected_items, expected_scores = model.recommend(
        new_items, cache_params=model(histories, use_cache=True).cache_params, k=8, exclude_seen=True)
    monkeypatch.setattr(modeling_m2rec, "TOP_K_CHUNK_ITEMS", 16)
    items, scores = model.recommend(new_items, cache_params=model(histories, use_cache=True).cache_params, k=8,
                                    exclude_seen=True)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert items.tolist() == expected_items.tolist()
