"""SASRec-style causal transformer (Kang & McAuley, 2018) with full cross-entropy: the comparison model.

It follows M2Rec's model protocol (right-padded item ids, 0 = padding, logits over all items, loss from labels of
shape (B, L) or (B,), `last_position_only`, `return_logits`) so that the same trainer, evaluator and benchmarks run
both. Learned positions, pre-LayerNorm blocks of causal self-attention and a GELU feed-forward, scores tied to the
item embeddings. Shapes: B batch, L sequence, D hidden size, H heads, I items + padding.

`SASRecKVCache` is the usual transformer way to score one new event without re-encoding the history: per layer the
keys and values of every past position, which the new position attends to (bench/bench_streaming.py compares it with
M2Rec's recurrent state).
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
    loss_excludes_history: bool = False  # as M2RecConfig.loss_excludes_history


class SASRecKVCache:
    """Each user's keys and values at every past position, per layer, preallocated for `max_len` positions (a
    static cache: a step writes one slot instead of concatenating, so its cost does not include copying the cache).

        keys[l], values[l]  (B, H, max_len, D/H)  position t's key and value for attention; slots from lengths[b] on
                                                  are not yet written (masked out)
        lengths             (B,)                  how many events each user has had (≤ max_len: learned positions
                                                  end there)
    """

    def __init__(self, config: SASRecConfig, batch_size: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_attention_heads, config.max_len,
                 config.hidden_size // config.num_attention_heads)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.long)

    def fill(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores a whole encoded sequence's keys and values, each (B, H, L, D/H), in slots 0..L−1."""
        self.keys[layer_idx][:, :, :keys.shape[2]] = keys
        self.values[layer_idx][:, :, :values.shape[2]] = values

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Writes one new position per user, keys and values (B, H, 1, D/H), at slot lengths[b]; returns the
        attention mask of the slots each user's new position sees, (B, 1, 1, max_len), True for 0..lengths[b]."""
        rows = torch.arange(len(self.lengths), device=self.lengths.device)
        self.keys[layer_idx][rows, :, self.lengths] = keys[:, :, 0]
        self.values[layer_idx][rows, :, self.lengths] = values[:, :, 0]
        slots = torch.arange(self.keys[layer_idx].shape[2], device=self.lengths.device)
        return (slots <= self.lengths[:, None])[:, None, None, :]


@dataclass
class SASRecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache_params: SASRecKVCache | None = None


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # this block's slot in a SASRecKVCache
        self.num_heads = config.num_attention_heads
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attention_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                                 nn.Linear(4 * config.hidden_size, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.hidden_dropout_prob

    def forward(self, hidden_states: torch.Tensor, cache: SASRecKVCache | None = None,
                use_cache: bool = False) -> torch.Tensor:
        """(B, L, D) → (B, L, D). With `use_cache`, the keys and values of every position are stored in `cache`;
        with `cache` alone, L = 1: each user's new position attends to its cached ones and its own, and is cached."""
        batch, length, width = hidden_states.shape
        q, k, v = (t.transpose(1, 2) for t in  # (B, H, L, D/H) each
                   self.qkv(self.attention_norm(hidden_states)).view(batch, length, 3, self.num_heads, -1).unbind(2))
        dropout = self.attention_dropout if self.training else 0.0
        if cache is None or use_cache:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            if use_cache:
                cache.fill(self.layer_idx, k, v)
        else:
            visible = cache.append(self.layer_idx, k, v)  # (B, 1, 1, max_len)
            attended = F.scaled_dot_product_attention(q, cache.keys[self.layer_idx], cache.values[self.layer_idx],
                                                      attn_mask=visible, dropout_p=dropout)
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
        self.blocks = nn.ModuleList(SASRecBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers))
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
                cache_params: SASRecKVCache | None = None, use_cache=False, **kwargs) -> SASRecOutput:
        """input_ids (B, L), right-padded with 0; with `cache_params`, (B, 1): each user's new event, attending to
        the cache, which it extends in place. `use_cache` returns a `SASRecKVCache` filled from input_ids."""
        length = input_ids.shape[1]
        mask = input_ids != 0 if attention_mask is None else attention_mask.bool()
        if cache_params is None:
            if length > self.config.max_len:
                raise ValueError(f"input_ids has {length} positions but max_len is {self.config.max_len}")
            positions = torch.arange(length, device=input_ids.device)  # (L,)
            cache = SASRecKVCache(self.config, len(input_ids), input_ids.device, self.dtype) if use_cache else None
        else:
            if input_ids.shape != (cache_params.lengths.shape[0], 1):
                raise ValueError(f"a step takes one new event per cached user, shape "
                                 f"({cache_params.lengths.shape[0]}, 1), got {tuple(input_ids.shape)}")
            if self.seen_item_offset is not None:
                raise ValueError("seen_item_bias scores a user's seen items, which the key/value cache does not keep: "
                                 "re-encode the history instead")
            if (cache_params.lengths >= self.config.max_len).any():
                raise ValueError(f"a cached user already has max_len={self.config.max_len} events")
            positions, cache = cache_params.lengths[:, None], cache_params  # (B, 1): each user's next position
        hidden = self.item_embeddings(input_ids) * self.config.hidden_size ** 0.5 + self.position_embeddings(positions)
        hidden = self.dropout(hidden)
        for block in self.blocks:
            hidden = block(hidden, cache, use_cache)
        hidden = self.final_norm(hidden)  # (B, L, D)
        if cache_params is not None:
            cache.lengths += 1
        elif use_cache:
            cache.lengths.copy_(mask.sum(1))

        last_states = hidden[torch.arange(len(input_ids), device=input_ids.device), mask.sum(1) - 1]  # (B, D)
        wants_seen = self.seen_item_offset is not None or (labels is not None and self.config.loss_excludes_history)
        seen_items = input_ids * mask if wants_seen else None
        loss = None
        if labels is not None:  # the same exact chunked full-softmax loss as M2Rec, so costs compare like for like
            loss = next_item_loss(hidden, last_states, self.item_embeddings.weight, labels, seen_items,
                                  self.seen_item_offset, exclude_seen=self.config.loss_excludes_history)
        logits = None
        if return_logits:
            logits = self.score(last_states if last_position_only else hidden, seen_items)
        return SASRecOutput(loss=loss, logits=logits, last_hidden_state=hidden, cache_params=cache)
