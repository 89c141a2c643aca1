"""How m2rec-train fits the model to FSDP2 (training/fsdp.py), in one process; the sharded runs themselves are in
test_train.py."""

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from m2rec import M2RecConfig, M2RecForSequentialRecommendation
from m2rec.training.fsdp import make_shardable


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = M2RecConfig(num_items=50, max_len=8, hidden_size=16, state_size=4, num_hidden_layers=2,
                         text_embedding_dim=6, seen_item_bias=True)
    model = M2RecForSequentialRecommendation(config)
    model.set_text_embeddings(torch.cat([torch.zeros(1, 6), torch.randn(50, 6)]))
    with torch.no_grad():  # away from their initial values, so that a parametrization that lost them would show
        model.m2rec.fusion.text_weight.fill_(0.7)
        model.seen_item_offset.fill_(-0.3)
    return model.eval()


def plugin(**options):
    return FullyShardedDataParallelPlugin(fsdp_version=2, **options)


def test_shardable_model_holds_scalars_as_vectors_and_computes_the_same():
    model, reference = tiny_model(), tiny_model()
    inputs = torch.tensor([[3, 9, 4, 0], [7, 7, 2, 5]])
    layer_policy = plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    make_shardable(model, layer_policy)
    assert layer_policy.transformer_cls_names_to_wrap == ["M2RecLayer"]  # not M2RecModel, which holds the item table
    assert all(parameter.dim() >= 1 for parameter in model.parameters())  # fully_shard refuses 0-d parameters
    assert model.m2rec.fusion.text_weight.shape == model.seen_item_offset.shape == ()
    assert model.seen_item_offset.item() == pytest.approx(-0.3)
    assert model.item_scorer.weight is model.m2rec.item_embeddings.weight
    labels = torch.tensor([[9, 4, -100, -100], [7, 2, 5, 1]])
    expected, got = (m(input_ids=inputs, labels=labels) for m in (reference, model))
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 100},
                                     {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                      "transformer_cls_names_to_wrap": ["M2RecModel"]}])
def test_a_wrap_policy_that_would_split_the_tied_item_table_is_refused(options):
    with pytest.raises(ValueError, match=r"would shard m2rec.* holds the item table"):
        make_shardable(tiny_model(), plugin(**options))
