"""Full-ranking metrics against rankings worked out by hand."""

import math

import pytest
import torch

from m2rec.training.metrics import MetricAccumulator, history_statistics, metrics_from_ranks, rank_targets

SCORES = torch.tensor([
    [9.0, 0.1, 0.5, 0.3, 0.9, 0.2],  # padding column 0 scores highest but is never ranked
    [0.0, 0.5, 0.5, 0.1, 0.5, 0.0],  # target 1 ties with items 2 and 4
])
TARGETS = torch.tensor([3, 1])


def test_rank_ignores_padding_and_ties_are_pessimistic():
    # Row 0: items 4 (0.9) and 2 (0.5) beat item 3 (0.3). Row 1: items 2 and 4 tie with the target.
    assert rank_targets(SCORES, TARGETS).tolist() == [2, 2]
    assert rank_targets(torch.zeros(1, 11), torch.tensor([7])).tolist() == [9]  # constant scores: last


def test_exclude_history_keeps_the_target():
    history = torch.tensor([[4, 0, 0], [2, 1, 4]])  # row 1's history contains its own target
    assert rank_targets(SCORES, TARGETS, history).tolist() == [1, 0]


def test_metric_values():
    values = metrics_from_ranks(torch.tensor([0, 2, 5, 19, 20]))
    assert values["HR@5"].tolist() == [1, 1, 0, 0, 0]
    assert values["HR@10"].tolist() == [1, 1, 1, 0, 0]
    assert values["HR@20"].tolist() == [1, 1, 1, 1, 0]
    assert values["NDCG@5"].tolist() == pytest.approx([1, 0.5, 0, 0, 0])
    assert values["NDCG@10"].tolist() == pytest.approx([1, 0.5, 1 / math.log2(7), 0, 0])
    assert values["MRR@20"].tolist() == pytest.approx([1, 1 / 3, 1 / 6, 1 / 20, 0])


def test_ranking_a_known_order():
    scores = torch.linspace(1, 0, 31)[None].repeat(3, 1)  # item i has the i-th highest score
    scores[:, 0] = 5
    assert rank_targets(scores, torch.tensor([1, 6, 30])).tolist() == [0, 5, 29]


def test_accumulator_counts_each_user_once():
    accumulator = MetricAccumulator(ks=(1, 3))
    accumulator.add(torch.tensor([0, 2]), torch.tensor([10, 11]))
    accumulator.add(torch.tensor([0, 1]), torch.tensor([11, 12]))  # user 11 again (distributed padding)
    results = accumulator.compute()
    assert results["num_users"] == 3
    assert results["HR@1"] == pytest.approx(1 / 3)  # ranks 0, 2, 1
    assert results["HR@3"] == pytest.approx(1.0)
    assert results["NDCG@3"] == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 3)
    assert results["MRR@3"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="no users"):
        MetricAccumulator().compute()


def test_history_statistics_count_own_items_in_the_top_and_rank_the_last_item():
    # Items 1..6. User 0 saw [2, 5] (last input 5) and the model puts 5, 2 on top: 2 own items in the top 3, the
    # last item first. User 1 saw [1], input [1]; its top 3 is 6, 4, 3: no own item, the last item ranks 6th.
    scores = torch.tensor([[0.0, 0.1, 0.8, 0.5, 0.2, 0.9, 0.4],
                           [0.0, 0.1, 0.2, 0.5, 0.6, 0.3, 0.7]])
    targets = torch.tensor([6, 4])
    input_ids = torch.tensor([[2, 5], [1, 0]])
    history = torch.tensor([[2, 5], [1, 0]])
    values = history_statistics(scores, rank_targets(scores, targets), rank_targets(scores, targets, history),
                                input_ids, history, k=3)
    assert values["seen_in_top3"].tolist() == [2.0, 0.0]
    assert values["last_item_in_top3"].tolist() == [1.0, 0.0] and values["last_item_at_top1"].tolist() == [1.0, 0.0]
    # User 0's target (0.4) ranks 4th with its history kept, 2nd with it removed; user 1's target ranks 2nd in both.
    assert values["history_kept/HR@3"].tolist() == [0.0, 1.0]
    assert values["history_excluded/HR@3"].tolist() == [1.0, 1.0]
    assert values["history_excluded/MRR@3"].tolist() == [0.5, 0.5]

    accumulator = MetricAccumulator(ks=(3,))
    accumulator.add(rank_targets(scores, targets), torch.tensor([0, 1]), values)
    accumulator.add(rank_targets(scores, targets), torch.tensor([1, 1]), values)  # already counted: skipped
    result = accumulator.compute()
    assert result["num_users"] == 2 and result["seen_in_top3"] == 1.0 and result["history_excluded/HR@3"] == 1.0
