"""SASRec-style causal transformer (Kang & McAuley, 2018) with full cross-entropy: the comparison model.

It follows M2Rec's model protocol (right-padded item ids, 0 = padding, logits over all items, loss from labels of
shape (B, L) or (B,), `last_position_only`, `return_logits`) so that the same trainer, evaluator and benchmarks run
both. Learned positions, pre-LayerNorm blocks of causal self-attention and a GELU feed-forward, scores tied to the
item embeddings. Shapes: B batch, L sequence, D hidden size, I items + padding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from m2rec.modeling_m2rec import add_seen_item_offset, next_item_loss


class SASRecConfig(PreTrainedConfig):
    model_type = "sasrec-bench"

    num_items: int = 3416
    max_len: int = 200
    hidden_size: int = 64  # same width as M2Rec
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    hidden_dropout_prob: float = 0.2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    seen_item_bias: bool = False  # as M2RecConfig.seen_item_bias


@dataclass
class SASRecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attention_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                                 nn.Linear(4 * config.hidden_size, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.hidden_dropout_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        q, k, v = self.qkv(self.attention_norm(hidden_states)).view(batch, length, 3, self.num_heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, heads, L, D/heads)
            dropout_p=self.attention_dropout if self.training else 0.0, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        hidden_states = hidden_states + self.dropout(self.attention_out(attended))
        return hidden_states + self.dropout(self.ffn(self.ffn_norm(hidden_states)))


class SASRec(PreTrainedModel):
    """A `PreTrainedModel` so that the trainer saves, selects and reloads it exactly as it does M2Rec."""

    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        self.item_embeddings = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_len, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.seen_item_offset = None
        if config.seen_item_bias:
            self.seen_item_offset = nn.Parameter(torch.zeros(()))
            self.seen_item_offset._no_weight_decay = True
        self.post_init()  # transformers' default init: N(0, initializer_range), padding row 0, LayerNorm 1/0

    def score(self, user_states: torch.Tensor, seen_items: torch.Tensor | None = None) -> torch.Tensor:
        logits = user_states @ self.item_embeddings.weight.t()  # (..., I)
        if self.seen_item_offset is not None and seen_items is not None:
            logits = add_seen_item_offset(logits, seen_items, self.seen_item_offset)
        logits[..., 0] = torch.finfo(logits.dtype).min
        return logits

    def forward(self, input_ids, attention_mask=None, labels=None, last_position_only=False, return_logits=True,
                **kwargs) -> SASRecOutput:
        length = input_ids.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"input_ids has {length} positions but max_len is {self.config.max_len}")
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.item_embeddings(input_ids) * self.config.hidden_size ** 0.5 + self.position_embeddings(positions)
        hidden = self.dropout(hidden)
        for block in self.blocks:
            hidden = block(hidden)
        hidden = self.final_norm(hidden)  # (B, L, D)

        mask = input_ids != 0 if attention_mask is None else attention_mask.bool()
        last_states = hidden[torch.arange(len(input_ids), device=input_ids.device), mask.sum(1) - 1]  # (B, D)
        seen_items = input_ids * mask if self.seen_item_offset is not None else None
        loss = None
        if labels is not None:  # the same exact chunked full-softmax loss as M2Rec, so costs compare like for like
            loss = next_item_loss(hidden, last_states, self.item_embeddings.weight, labels, seen_items,
                                  self.seen_item_offset)
        logits = None
        if return_logits:
            logits = self.score(last_states if last_position_only else hidden, seen_items)
        return SASRecOutput(loss=loss, logits=logits, last_hidden_state=hidden)
