"""Items scored by their text (`item_representation="id+text"`): every scoring path uses the same item vectors, and
a new item with text but no interactions is ranked by its text."""

import pytest
import torch
import torch.nn.functional as F

from m2rec import M2RecConfig, M2RecForSequentialRecommendation
from test_model import NUM_ITEMS, random_histories, tiny_model

NUM_CATEGORIES, TEXT_DIM = 4, 12


@torch.no_grad()
def test_every_scoring_path_uses_the_id_plus_text_vectors():
    model = tiny_model(item_representation="id+text", seen_item_bias=False)
    with torch.no_grad():
        model.m2rec.text_proj.weight.mul_(5.0)  # a text part that matters next to the ids
    input_ids = random_histories(3, 7)
    input_ids[1, 4:] = 0
    vectors = model.m2rec.item_embeddings.weight + model.m2rec.item_text_vectors()  # (I, D)
    assert not torch.allclose(vectors, model.m2rec.item_embeddings.weight)
    torch.testing.assert_close(model.item_embeddings(), vectors[1:])
    users = model.user_embeddings(input_ids)
    scores = model.next_item_scores(input_ids)
    torch.testing.assert_close(users @ model.item_embeddings().T, scores[:, 1:])
    outputs = model(input_ids)  # every position
    torch.testing.assert_close(outputs.logits[..., 1:], outputs.last_hidden_state @ vectors[1:].T)
    labels = random_histories(3, 7, seed=2)
    loss = model(input_ids, labels=labels).loss
    torch.testing.assert_close(loss, F.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten()))
    items, _ = model.recommend(input_ids, k=5)
    assert torch.equal(items, scores.topk(5).indices)


def test_the_text_part_trains_through_the_scorer():
    """With the gate's text weight α at 0 no text reaches the sequence, so the text projection learns only from the
    item vectors: under id+text, not under the id head."""
    input_ids, labels = random_histories(2, 6), random_histories(2, 6, seed=3)
    for item_representation, learns in (("id+text", True), ("id", False)):
        model = tiny_model(item_representation=item_representation).train()
        with torch.no_grad():
            model.m2rec.fusion.text_weight.zero_()
        model(input_ids, labels=labels).loss.backward()
        assert (model.m2rec.text_proj.weight.grad.abs().sum() > 0) == learns


def test_id_plus_text_needs_text():
    with pytest.raises(ValueError, match="item_representation='id\\+text' scores items by their text"):
        M2RecConfig(item_representation="id+text", fusion="none")
    with pytest.raises(ValueError, match="item_representation='text'"):
        M2RecConfig(item_representation="text")


def category_data(num_users, length, generator):
    """Users who stay in one category (item % NUM_CATEGORIES): histories (B, L) and next items (B, L)."""
    categories = torch.randint(0, NUM_CATEGORIES, (num_users, 1), generator=generator)
    picks = torch.randint(0, NUM_ITEMS // NUM_CATEGORIES, (num_users, length + 1), generator=generator)
    items = picks * NUM_CATEGORIES + categories + 1  # 1..NUM_ITEMS, category (item − 1) % NUM_CATEGORIES
    return items[:, :-1], items[:, 1:], categories.squeeze(1)


def category_text(item_ids, generator):
    """(C, E) text of items: their category's direction plus a little noise."""
    directions = torch.eye(TEXT_DIM)[:NUM_CATEGORIES]
    return directions[(item_ids - 1) % NUM_CATEGORIES] + 0.1 * torch.randn(len(item_ids), TEXT_DIM,
                                                                           generator=generator)


def trained_on_categories(item_representation):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = M2RecForSequentialRecommendation(M2RecConfig(
        num_items=NUM_ITEMS, max_len=8, hidden_size=16, state_size=8, text_embedding_dim=TEXT_DIM,
        hidden_dropout_prob=0.0, item_representation=item_representation))
    text = torch.cat([torch.zeros(1, TEXT_DIM), category_text(torch.arange(1, NUM_ITEMS + 1), generator)])
    model.set_text_embeddings(text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        input_ids, labels, _ = category_data(32, 8, generator)
        loss = model(input_ids, labels=labels, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), text


@torch.no_grad()
def new_item_ranks(model, text, twins, check_text_part):
    """Mean rank (1 best) of the new twin of a user's category among all items, after adding the twins and four items
    with random text."""
    random_text = torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    model.set_text_embeddings(torch.cat([text, text[twins], random_text]))
    new_twins, new_random = torch.arange(NUM_ITEMS + 1, NUM_ITEMS + 5), torch.arange(NUM_ITEMS + 5, NUM_ITEMS + 9)
    input_ids, _, categories = category_data(200, 8, torch.Generator().manual_seed(7))
    scores = model.next_item_scores(input_ids)  # (B, I)
    twin_scores = scores.gather(1, new_twins[categories, None])  # (B, 1)
    if check_text_part:
        text_part = model.user_embeddings(input_ids) @ model.m2rec.item_text_vectors()[twins].T  # (B, 4)
        torch.testing.assert_close(scores[:, new_twins], text_part)
        assert (model.m2rec.item_embeddings.weight[NUM_ITEMS + 1:] == 0).all()
        assert (twin_scores[:, 0] > scores[:, new_random].max(dim=1).values).float().mean() > 0.9
    return ((scores[:, 1:] > twin_scores).sum(dim=1) + 1).float().mean().item()


def test_a_new_item_is_ranked_by_its_text():
    """Four new items, each with the text of an existing item of one category, and four with random text: under
    id+text each twin scores exactly its existing item's text part (its id part is zero) and ranks near the top for
    users of its category, above the random-text items; under the id head the new items are noise."""
    twins = torch.tensor([1, 2, 3, 4])  # one existing item per category
    ranks = {}
    for item_representation in ("id+text", "id"):
        model, text = trained_on_categories(item_representation)
        ranks[item_representation] = new_item_ranks(model, text, twins, item_representation == "id+text")
    # 10 of the 48 items share a user's category (the twin's own category holds 11 with it)
    assert ranks["id+text"] <= 12, ranks
    assert ranks["id"] > 2 * ranks["id+text"], ranks
