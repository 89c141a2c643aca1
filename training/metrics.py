"""Full-ranking metrics: HR@K, NDCG@K, MRR@K over every item except padding (no sampled negatives).

Evaluation reduces each user to one number, the 0-based rank of their target; every metric follows
from it. In a distributed evaluation each process ranks its share of the users, gathers (ranks, user_index) with
`accelerator.gather`, and feeds them to a `MetricAccumulator`:

    ranks = rank_targets(scores, batch["target"], batch.get("history") if exclude_history else None)
    accumulator.add(*accelerator.gather((ranks, batch["user_index"])))
    results = accumulator.compute()   # {"HR@10": ..., "NDCG@10": ..., "MRR@10": ..., "num_users": ...}

Ties are pessimistic: an item with the same score as the target ranks above it. A model that gives
every item the same score therefore ranks every target last instead of first.

`history_statistics` adds what decides the gap between the two protocols (the user's earlier items
kept in the ranking, as the paper's tables have it, or removed): the @10 metrics under both, how many
of the top 10 are the user's own earlier items, and where the user's last input item ranks. They are
per-user values too, averaged by the same accumulator (`add(..., extras=...)`).
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


def last_input_items(input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) the last item of each right-padded row of input_ids (B, L)."""
    return input_ids.gather(1, ((input_ids != 0).sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)


def history_statistics(scores: torch.Tensor, ranks_kept: torch.Tensor, ranks_excluded: torch.Tensor,
                       input_ids: torch.Tensor, history: torch.Tensor, k: int = 10) -> dict[str, torch.Tensor]:
    """Per-user (B,) values that show how much a model spends its top k on the user's own history.

    scores: (B, I + 1); ranks_kept / ranks_excluded: (B,) the targets' `rank_targets` without / with `history`;
    input_ids: (B, L) the right-padded model input; history: (B, H) the full history before the target, padded
    with 0. Returns "history_kept/HR@k" … "history_excluded/MRR@k"
    (the @k metrics under both protocols), "seen_in_top{k}" (how many of the history-kept top k are items of
    the user's history) and "last_item_in_top{k}" / "last_item_at_top1" (whether the last input item is
    ranked among the top k / first, pessimistic ties as everywhere here).
    """
    scores = scores.detach().float()
    values = {}
    for protocol, ranks in (("history_kept", ranks_kept), ("history_excluded", ranks_excluded)):
        for name, value in metrics_from_ranks(ranks, (k,)).items():
            values[f"{protocol}/{name}"] = value
    ranked = scores.clone()
    ranked[:, 0] = float("-inf")  # padding is never recommended
    top = ranked.topk(min(k, ranked.shape[1] - 1), dim=1).indices  # (B, k)
    in_history = torch.zeros_like(ranked, dtype=torch.bool)  # (B, I + 1)
    in_history.scatter_(1, history, True)
    in_history[:, 0] = False
    values[f"seen_in_top{k}"] = in_history.gather(1, top).sum(1).double()
    last_rank = rank_targets(scores, last_input_items(input_ids))
    values[f"last_item_in_top{k}"] = (last_rank < k).double()
    values["last_item_at_top1"] = (last_rank == 0).double()
    return values


class MetricAccumulator:
    """Sums per-user metric values over batches and averages them.

    `add` takes ranks (B,), optionally each row's user index (B,), and optionally other per-user
    values {name: (B,)} to average alongside (`history_statistics`'s). A user already counted is
    skipped, so rows duplicated by distributed padding or an uneven last batch count once, and a row whose user
    index is negative (the padding of a process's share, `EvalDataset`) never counts.
    """

    def __init__(self, ks: Sequence[int] = KS):
        self.ks = tuple(ks)
        self.sums = {name: 0.0 for name in metrics_from_ranks(torch.zeros(0), self.ks)}
        self.count = 0
        self.seen: set[int] = set()

    def add(self, ranks: torch.Tensor, user_index: Optional[torch.Tensor] = None,
            extras: Optional[dict[str, torch.Tensor]] = None) -> None:
        rows = slice(None)
        if user_index is not None:
            rows = []
            for row, user in enumerate(user_index.tolist()):
                if user >= 0 and user not in self.seen:
                    self.seen.add(user)
                    rows.append(row)
        ranks = ranks.detach().cpu()[rows]
        values = metrics_from_ranks(ranks, self.ks)
        values.update({name: value.detach().cpu()[rows] for name, value in (extras or {}).items()})
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.sum().item()
        self.count += len(ranks)

    def compute(self) -> dict[str, float]:
        """Means over the users added so far, plus "num_users"."""
        if self.count == 0:
            raise ValueError("no users were added")
        return {**{name: total / self.count for name, total in self.sums.items()}, "num_users": self.count}
