"""What every transformers model does (issue 15, item 4): meta-device init, resizing the vocabulary, device_map offload,
gradient checkpointing, and refusing unknown forward keywords."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from m2rec import M2RecForSequentialRecommendation
from test_model import NUM_ITEMS, parameter_gradients, random_histories, tiny_model


def test_meta_device_build_and_init_weights_zero_the_text_buffer():
    config = tiny_model().config
    with torch.device("meta"):
        model = M2RecForSequentialRecommendation(config)
    model.to_empty(device="cpu")
    model.m2rec.text_embeddings.fill_(7.0)  # what uninitialised memory may hold
    model.init_weights()
    assert torch.equal(model.m2rec.text_embeddings, torch.zeros(NUM_ITEMS + 1, 12))


def test_checkpoint_without_the_text_buffer_loads_it_as_zero(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["m2rec.text_embeddings"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.m2rec.text_embeddings, torch.zeros(NUM_ITEMS + 1, 12))
    torch.testing.assert_close(loaded.m2rec.item_embeddings.weight, model.m2rec.item_embeddings.weight)


@pytest.mark.parametrize("num_items", [NUM_ITEMS + 7, NUM_ITEMS - 5])
def test_resize_token_embeddings_resizes_catalogue_text_and_scorer_and_reloads(tmp_path, num_items):
    model = tiny_model()
    old_embeddings = model.m2rec.item_embeddings.weight.detach().clone()
    old_text = model.m2rec.text_embeddings.clone()
    kept = min(NUM_ITEMS, num_items) + 1

    embeddings = model.resize_token_embeddings(num_items + 1)
    assert embeddings is model.m2rec.item_embeddings and embeddings.weight.shape == (num_items + 1, 16)
    assert model.config.num_items == num_items and model.m2rec.text_embeddings.shape == (num_items + 1, 12)
    assert model.item_scorer.weight is embeddings.weight
    torch.testing.assert_close(embeddings.weight[:kept], old_embeddings[:kept], rtol=0, atol=0)
    torch.testing.assert_close(model.m2rec.text_embeddings[:kept], old_text[:kept], rtol=0, atol=0)
    assert not model.m2rec.text_embeddings[kept:].any()  # new items have no text until set_text_embeddings

    input_ids = torch.tensor([[num_items, 1, 2]])
    assert model(input_ids).logits.shape == (1, 3, num_items + 1)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arguments, message", [((1,), "new_num_tokens"), ((True,), "new_num_tokens"),
                                                ((60, 8), "pad_to_multiple_of")])
def test_bad_resize_is_refused_before_changing_anything(arguments, message):
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.resize_token_embeddings(*arguments)
    assert model.config.num_items == NUM_ITEMS
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


def test_device_map_auto_with_disk_offload_matches_the_unoffloaded_scores(tmp_path):
    model = tiny_model(num_hidden_layers=2)
    model.save_pretrained(tmp_path / "model")
    # Room on the CPU for half the weights: before the encoder was placed whole, this split it and left its text
    # buffer without a device.
    half = model.get_memory_footprint(return_buffers=False) // 2
    offloaded = AutoModel.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": half},
                                          offload_folder=tmp_path / "offload")
    assert "disk" in offloaded.hf_device_map.values()
    assert offloaded.m2rec.item_embeddings.weight.device.type == "meta"  # really offloaded: loaded by the hooks
    input_ids = random_histories(3, 9)
    candidates = torch.tensor([3, 1, 4, 15, 9, 26])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids).logits, model(input_ids).logits)
        torch.testing.assert_close(offloaded.user_embeddings(input_ids), model.user_embeddings(input_ids))
        for options in ({}, {"candidates": candidates, "exclude_seen": True, "exclude_ids": candidates[:1]}):
            torch.testing.assert_close(offloaded.recommend(input_ids, k=3, **options),
                                       model.recommend(input_ids, k=3, **options))
    # What reads the item table outside a forward call would read the offloaded placeholder: refused.
    with pytest.raises(ValueError, match="item_embeddings\\(\\) reads the item table directly.*offloaded"):
        offloaded.item_embeddings()
    with pytest.raises(ValueError, match="the loss \\(labels\\) reads the item table directly"):
        offloaded(input_ids, labels=random_histories(3, 9, seed=2))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(num_hidden_layers=2, hidden_dropout_prob=0.2).train()
    input_ids = random_histories(3, 9)
    labels = random_histories(3, 9, seed=2)
    torch.manual_seed(0)
    expected = parameter_gradients(model, input_ids, labels)
    model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    mixer_calls = []
    model.m2rec.layers[0].mixer.register_forward_hook(lambda *_: mixer_calls.append(1))
    torch.manual_seed(0)  # the same dropout masks, which the recomputation replays
    for name, gradient in parameter_gradients(model, input_ids, labels).items():
        torch.testing.assert_close(gradient, expected[name], msg=name)
    assert len(mixer_calls) == 2  # the forward, and its recomputation in the backward


def test_unknown_forward_keyword_is_refused_by_name():
    model = tiny_model()
    input_ids = random_histories(2, 5)
    with pytest.raises(TypeError, match="last_positon_only"):
        model(input_ids, last_positon_only=True)
    with pytest.raises(TypeError, match="last_positon_only"):
        model.m2rec(input_ids, last_positon_only=True)
    with pytest.raises(ValueError, match="no attention"):
        model(input_ids, output_attentions=True)
    # The keywords transformers' callers pass are taken.
    plain = model(input_ids).logits
    output = model(input_ids=input_ids, attention_mask=input_ids != 0, output_attentions=False,
                   output_hidden_states=True, return_dict=True, use_cache=False)
    torch.testing.assert_close(output.logits, plain, rtol=0, atol=0)
