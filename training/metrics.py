"""Full-ranking metrics: HR@K, NDCG@K, MRR@K over every item except padding (no sampled negatives).

Evaluation reduces each user to one number, the 0-based rank of their target; every metric follows
from it. In a distributed evaluation each process ranks its users, gathers (ranks, user_index) with
`accelerator.gather_for_metrics`, and feeds them to a `MetricAccumulator`:

    ranks = rank_targets(scores, batch["target"], batch.get("history") if exclude_history else None)
    accumulator.add(*accelerator.gather_for_metrics((ranks, batch["user_index"])))
    results = accumulator.compute()   # {"HR@10": ..., "NDCG@10": ..., "MRR@10": ..., "num_users": ...}

Ties are pessimistic: an item with the same score as the target ranks above it. A model that gives
every item the same score therefore ranks every target last instead of first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

KS = (5, 10, 20)


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based rank of each target among items 1..I (column 0, padding, is never ranked).

    scores: (B, I + 1) over all item ids; targets: (B,) item ids in 1..I.
    history: optional (B, H) item ids padded with 0; those items are removed from the ranking
    (exclude_history). If the target itself is in the history (a repeat), it stays ranked: masking
    it would make the example unwinnable. In 5-core leave-one-out data such as ML-1M targets are new
    items, as RecBole assumes; with repeat consumption (check-ins, synthetic) they need not be.
    Returns (B,) long: the number of other ranked items scoring >= the target.
    """
    scores = scores.detach()
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ranked = torch.ones_like(scores, dtype=torch.bool)  # (B, I + 1): items that compete with the target
    ranked[:, 0] = False
    if history is not None:
        ranked.scatter_(1, history, False)  # padding 0 in history hits column 0, already out
    ranked.scatter_(1, targets[:, None], False)  # the target does not compete with itself
    return ((scores >= target_scores) & ranked).sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, torch.Tensor]:
    """Per-user HR@K, NDCG@K and MRR@K from 0-based ranks (B,): {"HR@10": (B,) float, ...}."""
    ranks = ranks.double()
    values = {}
    for k in ks:
        hit = ranks < k
        values[f"HR@{k}"] = hit.double()
        values[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0)
        values[f"MRR@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), 0.0)
    return values


class MetricAccumulator:
    """Sums per-user metric values over batches and averages them.

    `add` takes ranks (B,) and, optionally, each row's user index (B,): a user already counted is
    skipped, so rows duplicated by distributed padding or an uneven last batch count once.
    """

    def __init__(self, ks: Sequence[int] = KS):
        self.ks = tuple(ks)
        self.sums = {name: 0.0 for name in metrics_from_ranks(torch.zeros(0), self.ks)}
        self.count = 0
        self.seen: set[int] = set()

    def add(self, ranks: torch.Tensor, user_index: Optional[torch.Tensor] = None) -> None:
        ranks = ranks.detach().cpu()
        if user_index is not None:
            fresh = []
            for row, user in enumerate(user_index.tolist()):
                if user not in self.seen:
                    self.seen.add(user)
                    fresh.append(row)
            ranks = ranks[fresh]
        for name, values in metrics_from_ranks(ranks, self.ks).items():
            self.sums[name] += values.sum().item()
        self.count += len(ranks)

    def compute(self) -> dict[str, float]:
        """Means over the users added so far, plus "num_users"."""
        if self.count == 0:
            raise ValueError("no users were added")
        return {**{name: total / self.count for name, total in self.sums.items()}, "num_users": self.count}
