"""M2Rec: multi-scale Mamba with an adaptive FFT filter, LLM item text and a learnable gate (arXiv 2505.04445).

The forward path reads top to bottom:

    item ids ─► id embedding ─► LayerNorm, dropout ─┬─► adaptive FFT filter ─► AFFM layers (Mamba mixer + FFN) ─┐
                                                    └──────────── selection (Δ, B, C, gate) ──────────────────────┤
    item ids ─► frozen text buffer ─► projection ──────────────────────────────────────────► fusion (gate) ─► Y ─► Y·E_idᵀ

Item ids run 1..num_items, 0 is padding, sequences are right-padded (real items first). Every operator is causal in
the default configuration, so position t never sees items after t and a sequence scores the same whether it is
batched alone or with longer ones. The same causality lets a user's state be carried forward one event at a time
(`M2RecCache`, passed as `cache_params`).

Shapes: B batch, L sequence, D hidden size, Di mixer width, N state size, F frequency bins, I items + padding,
E text-embedding width.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_m2rec import M2RecConfig
from .cpu_mixer import MixerCPUFn, mixer_forward
from .item_text import encode_texts, format_item_text
from .kernels import (bf16_scoring_supported, blocked_window_sum, causal_conv1d, causal_conv1d_update,
                      causal_filter_convolution, causal_fft_kernel_spectrum, draw_negatives, filter_sums_directly,
                      filter_window_sum, first_occurrences, full_softmax_cross_entropy, resolve_backend,
                      sampled_softmax_cross_entropy, selective_scan, selective_state_update, top_k_items)


class M2RecCache:
    """Each user's state after the events seen so far, to score one new event without re-reading the history (the
    `cache_params` of [`M2RecModel`]; the idea of transformers' `MambaCache`, for recommendation).

    `model(histories, use_cache=True)` returns one filled from right-padded histories; `model(new_items,
    cache_params=cache)`, new_items (B, 1), continues it in place by one event per user. A cache built directly,
    `M2RecCache(config, batch_size)`, holds users who have seen nothing yet. Inference only: the states are kept
    without gradient, and in training mode dropout would draw new masks for the re-embedded window.

    Per layer l (Di mixer width, K `conv_kernel`, N `state_size`):
        conv_states[l]            (B, Di, K − 1)  the convolution's last K − 1 inputs, oldest first (0 before the
                                                  first event)
        selection_conv_states[l]  (B, Di, K − 1)  the same for the selection stream, which has its own convolution
                                                  under Algorithm 2 (`selection_source="unfiltered"`); None under
                                                  "filtered", where selection reads the scanned stream
        ssm_states[l]             (B, Di, N)      the SSM state h, in float32 (the scans' precision)
    For the model:
        item_ids    (B, max_len)  the most recent max_len items, oldest first, 0 before the first event: the causal
                                  FFT filter's kernel spans max_len lags, so each step re-embeds this window (the
                                  embedding is a function of the id: 8 bytes per event instead of D floats)
        num_events  (B,)          how many events each user has had, uncapped

    Beyond max_len events the state keeps what each operator's receptive field covers: the SSM state the whole
    history, the filter its max_len lags, the convolution its K. The scores then equal the full forward over the
    whole history with the `max_len` limit lifted (the filter still spanning max_len lags), not the batch path's,
    which cuts the history to its last max_len items before encoding it.
    """

    def __init__(self, config: M2RecConfig, batch_size: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if config.fft_mode == "global":
            raise ValueError(_GLOBAL_FILTER_HAS_NO_CACHE)
        conv_shape = (batch_size, config.mixer_size, config.conv_kernel - 1)
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        layers = range(config.num_hidden_layers)
        self.conv_states = [torch.zeros(conv_shape, device=device, dtype=dtype) for _ in layers]
        self.selection_conv_states = ([torch.zeros(conv_shape, device=device, dtype=dtype) for _ in layers]
                                      if config.selection_source == "unfiltered" else None)
        self.ssm_states = [torch.zeros(batch_size, config.mixer_size, config.state_size, device=device,
                                       dtype=ssm_dtype) for _ in layers]
        self.item_ids = torch.zeros(batch_size, config.max_len, device=device, dtype=torch.long)
        self.num_events = torch.zeros(batch_size, device=device, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.num_events.shape[0]

    def record_events(self, new_items: torch.Tensor) -> None:
        """Slides the item window by one event per user: new_items (B, 1)."""
        self.item_ids.copy_(torch.cat([self.item_ids[:, 1:], new_items], dim=1))
        self.num_events += 1


# The cache as a pytree of its tensors, so that torch.export takes it as an input of the one-event step (and
# `model(new_items, cache_params=cache)` exports with the cache's in-place update recorded as input mutations).
_CACHE_FIELDS = ("conv_states", "selection_conv_states", "ssm_states", "item_ids", "num_events")


def _flatten_cache(cache):
    return [getattr(cache, name) for name in _CACHE_FIELDS], None


def _unflatten_cache(children, _context):
    cache = M2RecCache.__new__(M2RecCache)
    for name, value in zip(_CACHE_FIELDS, children):
        setattr(cache, name, value)
    return cache


torch.utils._pytree.register_pytree_node(
    M2RecCache, _flatten_cache, _unflatten_cache, serialized_type_name=f"{__name__}.M2RecCache",
    flatten_with_keys_fn=lambda cache: ([(torch.utils._pytree.GetAttrKey(name), getattr(cache, name))
                                         for name in _CACHE_FIELDS], None))


_GLOBAL_FILTER_HAS_NO_CACHE = (
    "fft_mode='global' filters every position with the whole sequence, later items included, so a user's state "
    "cannot be carried forward one event at a time; a cache needs fft_mode='causal' or 'none'")


def _trailing_window(sequences: torch.Tensor, lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Each right-padded sequence's last `size` real positions, oldest first, zeros before its start:
    sequences (B, L, ...), lengths (B,) → (B, size, ...)."""
    batch = sequences.shape[0]
    padded = torch.cat([sequences.new_zeros(batch, size, *sequences.shape[2:]), sequences], dim=1)  # (B, size + L, ...)
    positions = lengths[:, None] + torch.arange(size, device=sequences.device)  # in padded coordinates
    return padded[torch.arange(batch, device=sequences.device)[:, None], positions]


def _at_positions(sequences: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One position per sequence: sequences (B, L, ...), positions (B,) → (B, 1, ...)."""
    rows = torch.arange(sequences.shape[0], device=sequences.device)
    return sequences[rows, positions].unsqueeze(1)


@dataclass
class M2RecModelOutput(ModelOutput):
    """Output of [`M2RecModel`].

    Args:
        last_hidden_state (`torch.FloatTensor`): the fused user representation Y, (B, L, D) at every position, or
            (B, 1, D) at each sequence's last real item with `last_position_only=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the sequence after the embedding, after the FFT filter
            and after each AFFM layer, each (B, L, D); returned with `output_hidden_states=True`.
        cache_params ([`M2RecCache`], *optional*): each user's state after its last real item; returned with
            `use_cache=True` or a `cache_params` input.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cache_params: M2RecCache | None = None


@dataclass
class M2RecRecommendationOutput(ModelOutput):
    """Output of [`M2RecForSequentialRecommendation`].

    Args:
        loss (`torch.FloatTensor` of shape (), *optional*): mean cross-entropy at every labelled position, over the
            full catalogue or, with `config.loss="sampled_softmax"`, its sampled estimate; returned when `labels` is
            given.
        logits (`torch.FloatTensor`): scores over all items, (B, L, I), or (B, I) with `last_position_only=True`.
            Column 0 (padding) holds the dtype's lowest value so that it is never ranked.
        last_hidden_state (`torch.FloatTensor`): the fused user representation, (B, L, D), or (B, 1, D) with
            `last_position_only=True` and no `labels` of shape (B, L).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): as in [`M2RecModelOutput`].
        cache_params ([`M2RecCache`], *optional*): as in [`M2RecModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cache_params: M2RecCache | None = None


def next_item_loss(user_states: torch.Tensor, last_states: torch.Tensor, item_weights: torch.Tensor,
                   labels: torch.Tensor, seen_items: torch.Tensor | None = None,
                   seen_offset: torch.Tensor | None = None, negative_sampler: str | None = None,
                   num_negatives: int = 0, item_counts: torch.Tensor | None = None,
                   negative_sharing: str = "batch", exclude_seen: bool = False) -> torch.Tensor:
    """Cross-entropy of the next item, over the full catalogue or sampled, shared by M2Rec and the bench baselines.

    user_states (B, L, D) and labels (B, L) train every position; last_states (B, D) and labels (B,) the last one.
    labels are −100 where there is no target. With `seen_offset`, `seen_items` (B, L) are the inputs (0 padding) whose
    logits get the offset: at position t the items up to t, for the last position all of them. With `exclude_seen`
    those items leave the full softmax instead, except each position's own target.
    With `negative_sampler` (see `kernels.draw_negatives`; `item_counts` (I,) for "popularity"), the sampled softmax
    with logQ correction over `num_negatives` negatives shared by the batch (`negative_sharing="batch"`) or drawn for
    each sequence (`"sequence"`) instead of the full softmax.
    """
    batch = labels.shape[0]
    if labels.dim() == 1:
        states, length = last_states, 1
        rows = torch.arange(batch, device=labels.device)
        positions = torch.full_like(rows, seen_items.shape[1] - 1 if seen_items is not None else 0)
        slots = torch.zeros_like(rows)  # each row's place among its sequence's scored rows
    else:
        length = labels.shape[1]
        states, labels = user_states.flatten(0, 1), labels.flatten()  # (B·L, D), (B·L,)
        rows = torch.arange(batch, device=labels.device).repeat_interleave(length)
        positions = slots = torch.arange(length, device=labels.device).repeat(batch)
    if not torch.compiler.is_compiling():
        # Leave the unlabelled rows (padding) out of the loss's work. Their number depends on the data, which a
        # compiled graph cannot follow: it passes them on, and the loss gives them no weight.
        labelled = labels != -100
        states, labels, rows, positions, slots = (t[labelled] for t in (states, labels, rows, positions, slots))
    seen = None
    if seen_offset is not None or exclude_seen:
        seen = (first_occurrences(seen_items), rows, positions)
    if negative_sampler is None:
        return full_softmax_cross_entropy(states, item_weights, labels, seen_offset, seen, exclude_seen)
    if exclude_seen:
        raise ValueError("exclude_seen is a form of the full softmax; the sampled softmax does not take it")
    per_sequence = negative_sharing == "sequence"
    negatives, log_expected_counts = draw_negatives(negative_sampler, num_negatives, labels, item_weights.shape[0] - 1,
                                                    item_counts, num_groups=batch if per_sequence else None)
    return sampled_softmax_cross_entropy(states, item_weights, labels, negatives, log_expected_counts, seen_offset,
                                         seen, sequences=(rows, slots, length) if per_sequence else None)


def add_seen_item_offset(logits: torch.Tensor, seen_items: torch.Tensor, seen_offset: torch.Tensor) -> torch.Tensor:
    """logits (B, L, I) or (B, I) plus `seen_offset` on the items of seen_items (B, L) (0 padding) that each row has
    seen: at position t the items up to t; for (B, I) all of them."""
    if logits.dim() == 3:  # a running count of first occurrences: 1 from an item's first position on
        first_items = first_occurrences(seen_items)
        seen = torch.zeros_like(logits).scatter_(2, first_items.unsqueeze(-1), 1.0).cumsum(dim=1)  # (B, L, I)
    else:
        seen = torch.zeros_like(logits).scatter_(1, seen_items, 1.0)  # (B, I)
    return logits + seen * seen_offset


# `recommend` ranks a catalogue of more items than this in chunks of this many (`kernels.top_k_items`): 64k items
# are 256 KB of float32 scores per history, so memory no longer grows with the catalogue, and each chunk is scored in
# bfloat16 where the device has it natively, then its possible top k again in float32 (the same ranking up to ties).
TOP_K_CHUNK_ITEMS = 1 << 16
STEP_CATALOGUE_USERS = 64  # a step embeds the whole catalogue when it is at most this many users' windows


def _kept_value_key(parameters: list[torch.Tensor], device) -> tuple | None:
    """The key under which a value computed from `parameters` without gradient may be kept from one call to the
    next, or None where it may not be kept: under torch.compile and torch.export (the graph computes it), or where
    one of them takes a gradient. The key holds each parameter's version counter (it counts every in-place write
    that autograd sees: an optimizer step, `load_state_dict`), storage and dtype, the device, and whether inference
    mode is on (a value made there is an inference tensor, which autograd may not save later). The caller keeps the
    parameters themselves next to the value and checks their identity too, so that a new parameter (`.to()`, a
    resized table) is never matched by a recycled storage address. Not seen: writes through `.data`."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in parameters)):
        return None
    return (tuple((p._version, p.data_ptr(), p.dtype) for p in parameters), torch.device(device),
            torch.is_inference_mode_enabled())


def _same_tensors(kept: list[torch.Tensor], current: list[torch.Tensor]) -> bool:
    return len(kept) == len(current) and all(a is b for a, b in zip(kept, current))


class M2RecFrequencyFilter(nn.Module):
    """Adaptive FFT filter (paper §III-D, eq. 9–13): `x + dropout(F⁻¹(W ⊙ M ⊙ F(x)))`, then LayerNorm.

    W (F × D, complex) is learnable when `fft_adaptive`, else fixed to 1; M keeps the lowest `1 - fft_cut_ratio`
    of the F bins. In `"causal"` mode W ⊙ M is turned into a time-domain kernel over n = 2·max_len, only its causal
    half (lags 0..max_len−1) is kept, and it is applied as a linear convolution through zero-padded FFTs, so output t
    depends on inputs ≤ t only. In `"global"` mode W ⊙ M multiplies the spectrum of the sequence zero-padded to
    max_len (the paper's circular filter: every position sees the whole sequence).

    Without gradient (inference), the causal kernel and its spectrum are computed once and kept until W changes
    (`causal_kernel`); recomputing them, an inverse FFT over 2·max_len and a forward one, took about half of the
    filter's time at batch 1 and L = 200.
    """

    def __init__(self, config: M2RecConfig):
        super().__init__()
        self.mode = config.fft_mode
        self.max_len = config.max_len
        self.fft_size = config.fft_size
        self.num_kept_bins = config.fft_kept_bins
        if config.fft_adaptive:
            # (F, D, 2): real and imaginary parts; initialised to the all-pass response 1 in _init_weights.
            self.frequency_response = nn.Parameter(torch.empty(config.fft_num_bins, config.hidden_size, 2))
        else:
            self.frequency_response = None
        self.num_bins = config.fft_num_bins
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # (key, kernel, length, spectrum, W) of the last no-grad call (see causal_kernel); a plain attribute: not
        # state, never saved
        self._kernel_cache = None

    def masked_response(self, device) -> torch.Tensor:
        """W ⊙ M as a complex (F, D) tensor, or a real (F, 1) mask when W is not learned."""
        low_pass = (torch.arange(self.num_bins, device=device) < self.num_kept_bins).float()  # (F,)
        if self.frequency_response is None:
            return low_pass[:, None]
        return torch.view_as_complex(self.frequency_response.float()) * low_pass[:, None]

    def causal_kernel(self, device, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The causal filter's time-domain kernel, lags 0..max_len−1: (D, max_len), or (1, max_len) when W is not
        learned (longer inputs than max_len see no further lags); and, for inputs of `length` steps, the kernel's
        spectrum for `causal_fft_convolution` ((D, length + 1) complex), or None without `length` or where W
        takes a gradient (the convolution then transforms the kernel itself, inside autograd's graph).

        Without gradient, both are kept from one call to the next (`_kept_value_key`), so that an optimizer step,
        `load_state_dict`, `.to()` or a new parameter invalidates them. Not detected: writes through `W.data` (e.g.
        `frequency_response.data.mul_(2)`), which autograd does not see either; call `clear_kernel_cache()` after
        such a write. Under torch.compile and torch.export nothing is kept: the graph computes the kernel from W."""
        parameters = [] if self.frequency_response is None else [self.frequency_response]
        key = _kept_value_key(parameters, device)
        if key is None:
            return self._kernel_from_response(device), None
        cached = self._kernel_cache
        if cached is not None and cached[0] == key and _same_tensors(cached[4], parameters):
            kernel, kept_length, spectrum = cached[1:4]
        else:
            # Kept in (max_len, D) memory, the layout the direct sum over the lags reads (it copied it at every call).
            kernel, kept_length, spectrum = self._kernel_from_response(device).t().contiguous().t(), None, None
        if length is not None and kept_length != length:
            kept_length, spectrum = length, causal_fft_kernel_spectrum(kernel, length)
        # One spectrum, of the last length asked for (a dict of every length seen would grow to max_len entries),
        # kept through calls that ask for none: a cached step between two re-encodes recomputed it every time.
        self._kernel_cache = (key, kernel, kept_length, spectrum, parameters)
        return kernel, spectrum if length is not None else None

    def clear_kernel_cache(self) -> None:
        """Forgets the kept kernel (see `causal_kernel`), after a write to W that its key cannot see."""
        self._kernel_cache = None

    def _kernel_from_response(self, device) -> torch.Tensor:
        """The causal kernel computed from W: (D, max_len), or (1, max_len) when W is not learned."""
        response = self.masked_response(device).t()  # (D, F), or (1, F)
        return torch.fft.irfft(response, n=self.fft_size)[..., :self.max_len]

    def filter(self, hidden_states: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """The filtered sequence F⁻¹(W ⊙ M ⊙ F(x)), (B, L, D) → (B, L, D), computed in float32; backend: the kernels'
        (None: "auto"), on which the causal convolution may be a direct sum (`causal_filter_convolution`).

        The transforms run along the last dimension of the (B, D, L) transpose: over contiguous memory they need
        none of the strided copies that transforming dim 1 of (B, L, D) costs, which took as long as the FFTs."""
        seq_len = hidden_states.shape[1]
        x = hidden_states.float().transpose(1, 2)  # (B, D, L)
        if self.mode == "global":
            response = self.masked_response(x.device).t()  # (D, F), or (1, F) when W is not learned
            spectrum = torch.fft.rfft(x, n=self.fft_size)  # (B, D, F)
            filtered = torch.fft.irfft(spectrum * response, n=self.fft_size)[..., :seq_len]
        else:
            kernel, spectrum = self.causal_kernel(x.device)
            # A kept spectrum (none under autograd or compile) only for the FFTs: at batch 1, transforming the kernel
            # for the direct sum, which never reads it, cost as much as that sum.
            if not (kernel.requires_grad or torch.compiler.is_compiling() or filter_sums_directly(x, kernel, backend)):
                spectrum = self.causal_kernel(x.device, seq_len)[1]
            filtered = causal_filter_convolution(x, kernel[..., :seq_len], spectrum, backend)  # (B, D, L): lags < L
        return filtered.transpose(1, 2)  # (B, L, D), a view

    def forward(self, hidden_states: torch.Tensor, window_ids: torch.Tensor | None = None,
                window_rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                backend: str | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D); with `window_ids` and `window_rows`, one cached step (see `step`): the new events'
        embeddings (B, 1, D) → the filter's output at them (B, 1, D). One entry point, so that hooks on this module
        see every use of W."""
        if window_ids is not None:
            return self.step(hidden_states, window_ids, window_rows, backend)
        filtered = self.filter(hidden_states, backend).to(hidden_states.dtype)
        return self.layer_norm(hidden_states + self.dropout(filtered))

    def step(self, newest: torch.Tensor, window_ids: torch.Tensor,
             window_rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], backend: str | None) -> torch.Tensor:
        """The causal filter's output at the newest event only: newest (B, 1, D), the embedded new events;
        window_ids (B, max_len), the most recent events' ids, oldest first (the newest last), 0 before the first;
        window_rows: the embedded catalogue (I, D), row 0 zero, whose rows the ids name, or, for a catalogue too
        large to embed whole at every step, `embed` itself, mapping ids (B, lags) to embeddings (B, lags, D);
        backend: the kernels' → (B, 1, D). Called through `forward(newest, window_ids, window_rows, backend)`.

        A direct sum over the lags: one position does not pay for FFTs. From the catalogue, `filter_window_sum`
        (the fused CPU loop reads the ids and sums the rows in cache); from `embed`, the window's positions are
        embedded and summed block by block (`blocked_window_sum`)."""
        kernel = self.causal_kernel(newest.device)[0].flip(-1).t()  # (max_len, D) or (max_len, 1): lag max_len−1 1st
        if isinstance(window_rows, torch.Tensor):
            filtered = filter_window_sum(window_ids, window_rows, kernel, backend)  # (B, D)
        else:
            filtered = blocked_window_sum(window_ids, kernel, window_rows)
        return self.layer_norm(newest + self.dropout(filtered.unsqueeze(1).to(newest.dtype)))


class _HalfProjection(nn.Linear):
    """The mixer's in_proj, one (2·Di, D) weight whose halves are applied as separate products: forward(states, half)
    gives half 0 (the scanned sequence x) or half 1 (the gate z), (..., D) → (..., Di). Each half is its own product
    so that it is contiguous: a strided half of one (..., 2·Di) product would be copied by the kernels."""

    def forward(self, states: torch.Tensor, half: int) -> torch.Tensor:
        return F.linear(states, self.weight.chunk(2, dim=0)[half])


class _CausalConv(nn.Conv1d):
    """The mixer's causal depthwise convolution + SiLU on the kernels of a backend (its weight (Di, 1, K) and bias
    (Di,) are nn.Conv1d's): forward(x, backend) maps (B, L, Di) → (B, L, Di); forward(x, backend, conv_state) is one
    step, (B, Di) → (B, Di), continuing conv_state (B, Di, K − 1) in place."""

    def forward(self, x: torch.Tensor, backend: str, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight.squeeze(1)  # (Di, K)
        if conv_state is not None:
            return causal_conv1d_update(x, conv_state, weight, self.bias, activation="silu", backend=backend)
        return causal_conv1d(x.transpose(1, 2), weight, self.bias, activation="silu", backend=backend).transpose(1, 2)


class _SelectionProjection(nn.Linear):
    """The mixer's x_proj, (..., Di) → Δ's rank-R input (..., R) and [B, C] (..., 2N), as two products: a contiguous
    (..., R) input makes dt_proj's rank-R product and its gradients several times faster than a strided slice of one
    (..., R + 2N) product."""

    def forward(self, selection: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        dt_weight, bc_weight = self.weight.split([rank, self.out_features - rank])
        return F.linear(selection, dt_weight), F.linear(selection, bc_weight)


class _StepProjection(nn.Linear):
    """The mixer's dt_proj: (..., R) → Δ before its bias (..., Di), and the bias (Di,), which the scan adds inside
    its softplus. The product takes a contiguous (R, Di) copy of the weight's transpose: autograd then takes the
    weight's gradient as the product (R, B·L)·(B·L, Di), five times faster than the (Di, B·L)·(B·L, R) that F.linear's
    transposed weight leads it to for R = 4."""

    def forward(self, dt_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.matmul(dt_rank, self.weight.t().contiguous()), self.bias


class M2RecMixer(nn.Module):
    """Mamba selective-SSM mixer (paper Algorithm 2, lines 5–12).

    in_proj → causal depthwise conv1d → SiLU → x_proj → (Δ via dt_proj + softplus, B, C) → selective scan with
    A = −exp(A_log) and skip D → × SiLU(z) → out_proj. The scan reads `hidden_states`; Δ, B, C and the gate z are
    computed from `selection_states` (the unfiltered sequence, Algorithm 2) or, when that is None, from
    `hidden_states` as in plain Mamba.

    Its weights are used by calling the submodules that hold them (never read from outside them), so that hooks on
    those submodules, e.g. accelerate's offloading, see every use; only `MixerCPUFn` and `mixer_forward` take them
    all at once, and only when every parameter is resident on the CPU.
    """

    def __init__(self, config: M2RecConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # this layer's slot in an M2RecCache
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.mixer_size = config.mixer_size
        self.config = config  # read at every call for its kernel_backend, so that a change on a loaded model counts
        self.in_proj = _HalfProjection(config.hidden_size, 2 * self.mixer_size, bias=False)
        self.conv1d = _CausalConv(self.mixer_size, self.mixer_size, config.conv_kernel, groups=self.mixer_size,
                                  padding=config.conv_kernel - 1)
        self.x_proj = _SelectionProjection(self.mixer_size, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = _StepProjection(self.time_step_rank, self.mixer_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.mixer_size, self.state_size))
        self.D = nn.Parameter(torch.empty(self.mixer_size))
        self.out_proj = nn.Linear(self.mixer_size, config.hidden_size, bias=False)
        # Marks read by the trainer's weight-decay groups (as in mamba-ssm): decaying these would pull A towards -1
        # and the skip towards 0.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_weight_decay = True

    def _select(self, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ before its bias and softplus, B and C from the selection stream, and Δ's bias: (..., Di) → (..., Di),
        (..., N), (..., N), (Di,)."""
        dt_rank, bc = self.x_proj(selection, self.time_step_rank)  # (..., R), (..., 2N)
        dt, dt_bias = self.dt_proj(dt_rank)  # (..., Di), (Di,)
        B, C = bc.split(self.state_size, dim=-1)  # (..., N) each
        return dt, B, C, dt_bias

    def forward(self, hidden_states: torch.Tensor, selection_states: torch.Tensor | None = None,
                cache: M2RecCache | None = None, mask: torch.Tensor | None = None,
                output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D), or (B, 1, D) at `output_positions` (B,), one position per sequence. A training
        step on the fused CPU kernels runs through `MixerCPUFn`, which keeps only the inputs for the backward (the
        same function and gradients as `compose`, to float32 rounding), and inference there through `mixer_forward`
        (the same function, without the submodule calls); everything else runs `compose`. With
        `cache`: a call with `mask` (B, L) encodes whole sequences and stores each one's state after its last real
        item there (`compose`); a call without continues it by one event (`step`, L = 1). The kernels' backend is
        resolved here, once per call, from `config.kernel_backend`."""
        backend = resolve_backend(hidden_states.device, self.config.kernel_backend)
        if cache is not None and mask is None:
            return self.step(hidden_states, selection_states, cache, backend)
        weights = None if cache is not None else self._fused_cpu_weights(hidden_states, backend)
        if weights is not None:
            # Without a selection sequence, both paths read hidden_states: the same x as `compose` shares.
            selection_states = hidden_states if selection_states is None else selection_states
            if not torch.is_grad_enabled():
                return mixer_forward(hidden_states, selection_states, *weights, output_positions)[0]
            mixed = MixerCPUFn.apply(hidden_states, selection_states, *weights)
            return mixed if output_positions is None else _at_positions(mixed, output_positions)
        return self.compose(hidden_states, selection_states, cache, mask, backend, output_positions)

    def _fused_cpu_weights(self, hidden_states: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...] | None:
        """Every parameter, in the order `MixerCPUFn` (with gradient) and `mixer_forward` (without) take them, when
        `forward` takes them: the backend is the fused CPU kernels, and inputs and parameters are float32 outside
        autocast (the kernels' one dtype there) and on the CPU (not offloaded); None otherwise. The tuple, not
        `self.parameters()`: walking the module tree was about 3 % of a batch-1 recommendation (cProfile)."""
        weights = (self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                   self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, self.out_proj.weight)
        fused = (backend == "cpu_fused" and not torch.is_autocast_enabled("cpu")
                 and hidden_states.dtype == torch.float32
                 and all(weight.dtype == torch.float32 and weight.device.type == "cpu" for weight in weights))
        return weights if fused else None

    def compose(self, hidden_states: torch.Tensor, selection_states: torch.Tensor | None = None,
                cache: M2RecCache | None = None, mask: torch.Tensor | None = None,
                backend: str | None = None, output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The mixer as the composition of its kernels, each differentiated by autograd, on any device: (B, L, D) →
        (B, L, D). With `cache` and the (B, L) `mask` of real items, each sequence's convolution and SSM states after
        its last real item are stored in the cache's slots for this layer. `backend`: the kernels' (None resolves
        `config.kernel_backend`). With `output_positions` (B,): the output at those positions only, (B, 1, D); the
        scan still reads every position, but the gate z and out_proj run at one position per sequence (the same
        values as the full output there, to float32 rounding)."""
        backend = resolve_backend(hidden_states.device, self.config.kernel_backend) if backend is None else backend
        gate_source = hidden_states if selection_states is None else selection_states
        # z only where the output is read: (B, L, Di), or (B, 1, Di) at output_positions
        gate_input = gate_source if output_positions is None else _at_positions(gate_source, output_positions)
        # Everything stays channel-last, (B, L, ·), as the projections produce it; the kernels take mamba-ssm's
        # (B, Di, L) shapes as transposed views, which the fused CPU kernels read without copying.
        x_pre = self.in_proj(hidden_states, 0)  # (B, L, Di)
        x = self.conv1d(x_pre, backend)
        if selection_states is None:
            selection = x
        else:
            selection_pre = self.in_proj(selection_states, 0)
            selection = self.conv1d(selection_pre, backend)
        z = self.in_proj(gate_input, 1)
        dt, B, C, dt_bias = self._select(selection)

        # The recurrence runs in float32 whatever autocast chose for the projections: a long product of decays
        # in half precision drifts.
        delta, delta_bias = dt.float(), dt_bias.float()
        if cache is not None:
            # Δ = 0 on the padding after each sequence's last item: exp(0·A) = 1 and 0·B·x = 0 carry its state
            # unchanged to the scan's last state, and no earlier output changes.
            delta, delta_bias = F.softplus(delta + delta_bias) * mask.unsqueeze(-1), None
        y, last_state = selective_scan(
            x.float().transpose(1, 2),
            delta.transpose(1, 2),
            -torch.exp(self.A_log.float()),  # (Di, N)
            B.float().transpose(1, 2),  # (B, N, L)
            C.float().transpose(1, 2),  # (B, N, L)
            self.D.float(),
            z=z.float().transpose(1, 2) if output_positions is None else None,  # else gated below
            delta_bias=delta_bias,
            delta_softplus=delta_bias is not None,
            return_last_state=True,
            backend=backend,
        )  # (B, Di, L), (B, Di, N)

        if cache is not None:
            lengths, width = mask.sum(dim=1), self.conv1d.kernel_size[0] - 1
            cache.ssm_states[self.layer_idx].copy_(last_state.detach())
            cache.conv_states[self.layer_idx].copy_(_trailing_window(x_pre.detach(), lengths, width).transpose(1, 2))
            if selection_states is not None:
                cache.selection_conv_states[self.layer_idx].copy_(
                    _trailing_window(selection_pre.detach(), lengths, width).transpose(1, 2))
        y = y.transpose(1, 2)  # (B, L, Di)
        if output_positions is not None:
            y = _at_positions(y, output_positions) * F.silu(z.float())  # (B, 1, Di)
        return self.out_proj(y.to(hidden_states.dtype))  # (B, L, D), or (B, 1, D)

    def step(self, hidden_states: torch.Tensor, selection_states: torch.Tensor | None,
             cache: M2RecCache, backend: str) -> torch.Tensor:
        """One event per user, continuing this layer's states in `cache` (updated in place): (B, 1, D) → (B, 1, D);
        the same arithmetic as `compose` at the newest position."""
        x = self.conv1d(self.in_proj(hidden_states[:, 0], 0), backend, cache.conv_states[self.layer_idx])  # (B, Di)
        if selection_states is None:
            selection, z = x, self.in_proj(hidden_states[:, 0], 1)
        else:
            selection = self.conv1d(self.in_proj(selection_states[:, 0], 0), backend,
                                    cache.selection_conv_states[self.layer_idx])
            z = self.in_proj(selection_states[:, 0], 1)  # (B, Di)
        dt, B, C, dt_bias = self._select(selection)
        y = selective_state_update(cache.ssm_states[self.layer_idx], x.float(), dt.float(),
                                   -torch.exp(self.A_log.float()), B.float(), C.float(), self.D.float(), z=z.float(),
                                   dt_bias=dt_bias.float(), dt_softplus=True, backend=backend)  # (B, Di)
        return self.out_proj(y.to(hidden_states.dtype)).unsqueeze(1)  # (B, 1, D)


class M2RecLayer(GradientCheckpointingLayer):
    """One AFFM layer: Mamba mixer, dropout, residual (unless `config.mixer_residual` is off), LayerNorm; then a
    position-wise feed-forward (GELU) with dropout, residual and LayerNorm.

    The unit of gradient checkpointing (`model.gradient_checkpointing_enable()`): its activations are recomputed in
    the backward. A cache filled in training mode is filled again by the recomputation, with the same values."""

    def __init__(self, config: M2RecConfig, layer_idx: int):
        super().__init__()
        self.mixer = M2RecMixer(config, layer_idx)
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mixer_residual = config.mixer_residual

    def forward(self, hidden_states: torch.Tensor, selection_states: torch.Tensor | None = None,
                cache: M2RecCache | None = None, mask: torch.Tensor | None = None,
                output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D); `cache` and `mask` as in [`M2RecMixer.forward`]. With `output_positions` (B,), one
        position per sequence: (B, 1, D), the output there. The mixer still reads every position; everything after
        it is position-wise and runs at those positions only."""
        mixed = self.dropout(self.mixer(hidden_states, selection_states, cache, mask, output_positions))
        if output_positions is not None:
            hidden_states = _at_positions(hidden_states, output_positions)  # (B, 1, D)
        hidden_states = self.mixer_norm(hidden_states + mixed if self.mixer_residual else mixed)
        feed_forward = self.ffn_out(self.dropout(F.gelu(self.ffn_in(hidden_states))))
        return self.ffn_norm(hidden_states + self.dropout(feed_forward))


class M2RecFusion(nn.Module):
    """Fuses the text features E_text and the sequence features E_mamba, both (B, L, D), into Y (B, L, D).

    `"gate"` is the paper's eq. 16, `Y = Linear(α·E_text + β·E_mamba)` with learnable scalars α, β;
    `"context_gate"` uses a per-dimension gate g = σ(Linear([E_text; E_mamba])), `Y = Linear(g·E_text + (1−g)·E_mamba)`;
    `"sum"` is `Linear(E_text + E_mamba)` and `"concat"` is `Linear([E_text; E_mamba])` (the paper's ablations).
    With `config.fusion_residual` (not in the paper), `Y = E_mamba + fused`: the sequence features reach the scorer
    as they do in the model without text, and the fusion adds to them.
    """

    def __init__(self, config: M2RecConfig):
        super().__init__()
        self.fusion, self.residual = config.fusion, config.fusion_residual
        hidden = config.hidden_size
        if self.fusion == "gate":
            self.text_weight = nn.Parameter(torch.ones(()))  # α
            self.sequence_weight = nn.Parameter(torch.ones(()))  # β
        if self.fusion == "context_gate":
            self.gate_proj = nn.Linear(2 * hidden, hidden)
        self.out_proj = nn.Linear(2 * hidden if self.fusion == "concat" else hidden, hidden)

    def forward(self, text_features: torch.Tensor, sequence_features: torch.Tensor) -> torch.Tensor:
        if self.fusion == "gate":
            mixed = self.text_weight * text_features + self.sequence_weight * sequence_features
        elif self.fusion == "context_gate":
            gate = torch.sigmoid(self.gate_proj(torch.cat([text_features, sequence_features], dim=-1)))
            mixed = gate * text_features + (1 - gate) * sequence_features
        elif self.fusion == "sum":
            mixed = text_features + sequence_features
        else:  # concat
            mixed = torch.cat([text_features, sequence_features], dim=-1)  # (B, L, 2D)
        fused = self.out_proj(mixed)
        return sequence_features + fused if self.residual else fused


class M2RecPreTrainedModel(PreTrainedModel):
    config_class = M2RecConfig
    base_model_prefix = "m2rec"
    supports_gradient_checkpointing = True
    # The encoder is placed whole: it reads its own text buffer, and transformers' device-map inference gives no
    # device to the buffers of a module it splits (`device_map="auto"` failed with "no device for
    # m2rec.text_embeddings"). Its layers are small next to the (I, D) and (I, E) catalogue tables it holds anyway.
    _no_split_modules = ["M2RecModel", "M2RecLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Embedding ~ N(0, initializer_range), padding row 0, LayerNorm 1/0
        config = self.config
        if isinstance(module, M2RecMixer):
            # Mamba's initialisation: S4D-real A = −(1..N), unit skip, Δ log-uniform in [dt_min, dt_max].
            A = torch.arange(1, config.state_size + 1, dtype=torch.float32).expand(config.mixer_size, -1)
            module.A_log.copy_(torch.log(A))
            module.D.fill_(1.0)
            dt_std = config.time_step_rank ** -0.5
            nn.init.uniform_(module.dt_proj.weight, -dt_std, dt_std)
            log_min, log_max = torch.log(torch.tensor([config.time_step_min, config.time_step_max]))
            dt = torch.exp(torch.rand(config.mixer_size) * (log_max - log_min) + log_min)
            dt = dt.clamp(min=config.time_step_floor)
            module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            nn.init.kaiming_uniform_(module.conv1d.weight, a=5 ** 0.5)
            module.conv1d.bias.zero_()
        elif isinstance(module, M2RecFrequencyFilter) and module.frequency_response is not None:
            # Start from the all-pass response W = 1 (so the filter starts as the plain low-pass mask), with a little
            # noise so that the bins do not move in lockstep.
            module.frequency_response.normal_(0.0, config.initializer_range)
            module.frequency_response[..., 0] += 1.0
        elif isinstance(module, M2RecFusion) and module.fusion == "gate":
            module.text_weight.fill_(1.0)
            module.sequence_weight.fill_(1.0)
        elif isinstance(module, M2RecForSequentialRecommendation) and module.seen_item_offset is not None:
            module.seen_item_offset.zero_()  # start as the paper's scorer
        elif isinstance(module, M2RecModel) and module.config.fusion != "none":
            # No text until `set_text_embeddings` (a model built on the meta device, or a checkpoint without the
            # buffer, would otherwise hold whatever memory it got). `init.zeros_` leaves a loaded buffer alone.
            init.zeros_(module.text_embeddings)

    def resize_token_embeddings(self, new_num_tokens: int | None = None,
                                pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Resizes the catalogue to `new_num_tokens - 1` items (`new_num_tokens` counts the padding row 0, as
        `config.vocab_size` does), growing or cutting the item embeddings, the text buffer and the tied scorer together
        (see [`M2RecModel.resize_catalogue`]). Returns the item embeddings; without `new_num_tokens`, unchanged.

        `pad_to_multiple_of` is refused: every row is an item that `recommend` can return, so padding rows would be
        recommended as items that do not exist. (transformers' `mean_resizing` is not taken: new rows start as the
        model's own initialisation.)"""
        if pad_to_multiple_of is not None:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} is not supported: every row of the item "
                             f"embeddings is an item that can be recommended, so padding rows would be fake items")
        if new_num_tokens is not None:
            if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 2:
                raise ValueError(f"new_num_tokens must be an integer >= 2 (num_items + 1: the padding row 0 and at "
                                 f"least one item), got {new_num_tokens!r}")
            self.resize_catalogue(new_num_tokens - 1)
        return self.get_input_embeddings()


class M2RecModel(M2RecPreTrainedModel):
    """The M2Rec encoder: item ids (B, L) → fused user representation Y (B, L, D)."""

    def __init__(self, config: M2RecConfig):
        super().__init__(config)
        self.item_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.frequency_filter = M2RecFrequencyFilter(config) if config.fft_mode != "none" else None
        self.layers = nn.ModuleList(M2RecLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers))
        if config.fusion != "none":
            # Frozen item-text embeddings (I, E), persistent so that model.safetensors carries them and a published
            # model needs no text encoder. Row 0 (padding) stays zero. Fill with `set_text_embeddings`.
            self.register_buffer("text_embeddings", torch.zeros(config.vocab_size, config.text_embedding_dim))
            self.text_proj = nn.Linear(config.text_embedding_dim, config.hidden_size)
            self.text_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.fusion = M2RecFusion(config)
        # (key, embedded catalogue, parameters) of the last cached step (see _window_rows); a plain attribute: not
        # state, never saved
        self._catalogue_cache = None
        self.post_init()

    def get_input_embeddings(self):
        return self.item_embeddings

    def set_input_embeddings(self, value):
        self.item_embeddings = value

    @torch.no_grad()
    def set_text_embeddings(self, text_embeddings: torch.Tensor) -> None:
        """Replace the frozen item-text embeddings, or grow them for new items.

        Args:
            text_embeddings: (num_items + 1, text_embedding_dim) floating tensor, row i for item i; row 0 (padding) must
                be zero. More rows than `config.num_items + 1` grow the catalogue: `config.num_items` and the item
                embeddings grow with it (new item rows as in `resize_catalogue`).
        """
        if not isinstance(text_embeddings, torch.Tensor) or not text_embeddings.is_floating_point():
            raise ValueError(f"text_embeddings must be a floating-point tensor, got "
                             f"{getattr(text_embeddings, 'dtype', type(text_embeddings))}")
        if self.config.fusion == "none":
            raise ValueError("this model was built with fusion='none' and has no text embeddings")
        expected_dim = self.config.text_embedding_dim
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != expected_dim:
            raise ValueError(f"text_embeddings must have shape (num_items + 1, {expected_dim}), "
                             f"got {tuple(text_embeddings.shape)}")
        if text_embeddings.shape[0] < self.config.vocab_size:
            raise ValueError(f"text_embeddings has {text_embeddings.shape[0]} rows but the model has "
                             f"{self.config.vocab_size} (num_items + 1, padding row 0 included); a catalogue can only grow")
        bad_rows = (~torch.isfinite(text_embeddings)).any(dim=1).nonzero().flatten()
        if len(bad_rows):
            raise ValueError(f"text_embeddings has non-finite values (NaN or inf) in rows {bad_rows[:10].tolist()}")
        if text_embeddings[0].abs().max() > 0:
            raise ValueError("row 0 of text_embeddings is the padding item and must be all zeros")
        if text_embeddings.shape[0] > self.config.vocab_size:
            self.resize_catalogue(text_embeddings.shape[0] - 1)
        self.text_embeddings = text_embeddings.to(self.text_embeddings.device, self.text_embeddings.dtype).clone()

    @torch.no_grad()
    def resize_catalogue(self, num_items: int) -> None:
        """Makes the catalogue items 1..num_items: the item embeddings (I, D) and the text buffer (I, E) keep the rows
        of the items that stay; items beyond the old catalogue get zero text (fill it with `set_text_embeddings`) and
        id embeddings initialised like the others, or zero under `item_representation="id+text"`, where a new item's
        score is then its text's alone (a random id part would add noise no interaction has trained, and zero is that
        noise's mean); items beyond `num_items` are dropped. `config.num_items` follows.
        """
        old = self.item_embeddings
        kept_rows = min(old.num_embeddings, num_items + 1)
        new = nn.Embedding(num_items + 1, old.embedding_dim, padding_idx=0, device=old.weight.device,
                           dtype=old.weight.dtype)
        if self.config.item_representation == "id+text":
            new.weight.zero_()
        else:
            nn.init.normal_(new.weight, 0.0, self.config.initializer_range)
        new.weight[:kept_rows] = old.weight[:kept_rows]
        new.weight.requires_grad_(old.weight.requires_grad)
        self.item_embeddings = new
        if self.config.fusion != "none":
            text = self.text_embeddings.new_zeros(num_items + 1, self.text_embeddings.shape[1])
            text[:kept_rows] = self.text_embeddings[:kept_rows]
            self.text_embeddings = text
        self.config.num_items = num_items

    def _validate_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Checks ids and padding; returns the (B, L) boolean mask of real items."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            # Refused rather than answered with an empty result: no loss or ranking exists for it, and a caller
            # that filtered every history away is better told here than by a kernel (the FFT's MKL error).
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: the batch holds no sequence; "
                             f"pass at least one history")
        if input_ids.shape[1] > self.config.max_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions but max_len is {self.config.max_len}; "
                             f"keep each user's most recent {self.config.max_len} items")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        mask = input_ids != 0 if attention_mask is None else attention_mask.bool()
        # The checks below read the values. torch.compile and torch.export trace the model for inputs they never
        # see, where such a check cannot branch: they skip them (eager mode, where errors are raised, always checks).
        if torch.compiler.is_compiling():
            return mask
        # Whether anything is wrong, in as few operators as possible (a (B, L) flag tensor built from every check
        # took 47-73 µs for a (1, 200) batch, these tests 28 µs); only a batch with a problem runs the checks one by
        # one, to name the first. A row that is empty or not right-padded has a padded first position or a mask that
        # rises somewhere (a real item after padding). On CUDA each test waits for the device: four short waits.
        if input_ids.shape[1] == 0:  # no position at all: every row is empty
            self._raise_input_error(input_ids, attention_mask, mask)
        lowest, highest = torch.aminmax(input_ids)
        if (lowest < 0 or highest > self.config.num_items or not mask[:, 0].all()
                or (mask[:, 1:] > mask[:, :-1]).any()
                or (attention_mask is not None and (mask & (input_ids == 0)).any())):
            self._raise_input_error(input_ids, attention_mask, mask)
        return mask

    def _raise_input_error(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           mask: torch.Tensor) -> None:
        """Raises the ValueError naming the first problem of inputs that `_validate_inputs` flagged."""
        out_of_range = (input_ids < 0) | (input_ids > self.config.num_items)
        if out_of_range.any():
            row, pos = out_of_range.nonzero()[0].tolist()
            raise ValueError(f"item id {input_ids[row, pos].item()} at (row {row}, position {pos}) is outside "
                             f"0..{self.config.num_items} (0 is padding)")
        if attention_mask is not None:
            padded_item = mask & (input_ids == 0)
            if padded_item.any():
                row, pos = padded_item.nonzero()[0].tolist()
                raise ValueError(f"attention_mask marks padding id 0 at (row {row}, position {pos}) as a real item")
        not_right_padded = mask[:, 1:] & ~mask[:, :-1]
        if not_right_padded.any():
            row = not_right_padded.nonzero()[0, 0].item()
            raise ValueError(f"row {row} is not right-padded: real items must come first, padding (0) after")
        empty = ~mask.any(dim=1)
        if empty.any():
            raise ValueError(f"rows {empty.nonzero().flatten()[:10].tolist()} contain only padding; every sequence "
                             f"needs at least one item")
        raise AssertionError("_validate_inputs flagged a problem that no check names")  # unreachable: a bug

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings of the items in the sequence, (B, L) → (B, L, D)."""
        positions = input_ids.numel()  # symbolic in a program traced for any batch size: project per position there
        if not isinstance(positions, int) or positions < self.text_embeddings.shape[0]:
            projected = self.text_proj(self.text_embeddings[input_ids])  # (B, L, E) → (B, L, D)
        else:  # projecting the whole table once is cheaper than projecting every position
            projected = F.embedding(input_ids, self.text_proj(self.text_embeddings))
        return F.dropout(self.text_norm(projected), self.config.text_dropout_prob, self.training)

    def item_text_vectors(self) -> torch.Tensor:
        """Every item's projected text, the same projection and norm as `text_features`: (I, E) → (I, D). The text
        part of the scorer's item vectors under `item_representation="id+text"`."""
        return self.text_norm(self.text_proj(self.text_embeddings))

    def embed(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The embedded sequence, padding zeroed: (B, L) → (B, L, D). `mask` (B, L): the real items, when the caller
        has it (`input_ids != 0` otherwise)."""
        embedded = self.dropout(self.embedding_norm(self.item_embeddings(input_ids)))  # (B, L, D)
        mask = input_ids != 0 if mask is None else mask
        # Zero the padding so that the filter's spectrum and window only contain real items. A product with the
        # boolean mask (promoted to the embedding's dtype): faster than masked_fill here.
        return embedded * mask.unsqueeze(-1)

    def _window_rows(self, device: torch.device) -> torch.Tensor | Callable[[torch.Tensor], torch.Tensor]:
        """What a cached step's filter reads its item window from (`M2RecFrequencyFilter.step`). A catalogue of at
        most `STEP_CATALOGUE_USERS` users' windows (I ≤ that × max_len) is embedded whole, (I, D), and the window
        names its rows: one LayerNorm per item instead of one per window position (the step at B = 256,
        max_len = 2,000 took 1.64× as long without it); a larger catalogue would cost more than the windows it
        saves, so `embed` is returned, to embed the window's positions. A rule on the config, not on the batch, so
        that an exported step keeps a dynamic batch. The same values as `embed` in eval mode, the only mode a cache
        is for.

        The embedded catalogue is kept from one step to the next while its parameters stay the same
        (`_kept_value_key`; `clear_catalogue_cache()` after a write through `.data`): embedding 3,417 items at every
        step was 60 % of a batch-1 step's time at L = 200. Not kept in training mode (dropout) or under
        compile/export."""
        if self.config.vocab_size > STEP_CATALOGUE_USERS * self.config.max_len:
            return self.embed
        parameters = [self.item_embeddings.weight, self.embedding_norm.weight, self.embedding_norm.bias]
        key = None if self.training else _kept_value_key(parameters, device)
        cached = self._catalogue_cache
        if key is not None and cached is not None and cached[0] == key and _same_tensors(cached[2], parameters):
            return cached[1]
        rows = self.embed(torch.arange(self.config.vocab_size, device=device))  # (I, D), row 0 (padding) zero
        self._catalogue_cache = None if key is None else (key, rows, parameters)
        return rows

    def clear_catalogue_cache(self) -> None:
        """Forgets the embedded catalogue that cached steps keep (see `_window_rows`), after a write to the item
        embeddings or their norm that its key cannot see."""
        self._catalogue_cache = None

    def _validate_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache_params: M2RecCache) -> None:
        """Checks one new event per user of the cache's batch."""
        self._validate_inputs(input_ids, attention_mask)
        if input_ids.shape != (cache_params.batch_size, 1):
            raise ValueError(f"a call with cache_params continues each of its {cache_params.batch_size} users by one "
                             f"event: input_ids must have shape ({cache_params.batch_size}, 1), got "
                             f"{tuple(input_ids.shape)}")

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        last_position_only: bool = False,
        cache_params: M2RecCache | None = None,
        use_cache: bool = False,
        output_attentions: bool | None = None,
    ) -> M2RecModelOutput | tuple:
        """
        Args:
            input_ids: (B, L) item ids, right-padded with 0; at most `config.max_len` positions. With `cache_params`,
                (B, 1): each user's new event.
            attention_mask: (B, L), 1 for real items; derived from `input_ids != 0` when omitted.
            last_position_only: fuse only each sequence's last real position, for next-item inference.
            cache_params: an [`M2RecCache`] to continue by one event per user, in place.
            use_cache: also return an [`M2RecCache`] holding each user's state after its last real item.
            output_attentions: taken because transformers' tools pass it; M2Rec has no attention, so True is refused.
        There is no `**kwargs`: a misspelt keyword raises a TypeError naming it instead of being ignored. (transformers'
        Trainer passes `num_items_in_batch` only to a forward that takes `**kwargs`; without it, it scales the mean
        loss for gradient accumulation itself.)
        Returns:
            [`M2RecModelOutput`] with `last_hidden_state` (B, L, D), or (B, 1, D) with `last_position_only` or
            `cache_params`, and the cache with `use_cache` or `cache_params`.
        """
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions:
            raise ValueError("output_attentions=True: M2Rec has no attention layers (its mixer is a state-space "
                             "scan); use output_hidden_states=True for the per-layer outputs")
        if (use_cache or cache_params is not None) and self.config.fft_mode == "global":
            raise ValueError(_GLOBAL_FILTER_HAS_NO_CACHE)

        backend = resolve_backend(input_ids.device, self.config.kernel_backend)
        if cache_params is None:
            mask = self._validate_inputs(input_ids, attention_mask)
            embedded = self.embed(input_ids if attention_mask is None else input_ids * mask, mask)  # (B, L, D)
            hidden = (embedded if self.frequency_filter is None
                      else self.frequency_filter(embedded, backend=backend))
            cache = None
            if use_cache:
                cache = M2RecCache(self.config, input_ids.shape[0], device=input_ids.device, dtype=self.dtype)
                lengths = mask.sum(dim=1)
                cache.item_ids.copy_(_trailing_window(input_ids * mask, lengths, self.config.max_len))
                cache.num_events.copy_(lengths)
        else:
            self._validate_step(input_ids, attention_mask, cache_params)
            mask, cache = None, cache_params  # no mask: the layers continue the cache instead of filling it
            cache.record_events(input_ids)
            embedded = self.embed(input_ids)  # (B, 1, D)
            if self.frequency_filter is None:
                hidden = embedded
            else:  # the filter reads the window of recent items
                hidden = self.frequency_filter(embedded, cache.item_ids, self._window_rows(input_ids.device), backend)
        all_hidden = (embedded, hidden)

        selection = embedded if self.config.selection_source == "unfiltered" else None
        # Inference at the last position only (a step's one position is the last): everything after the last
        # layer's mixer is position-wise, so the last layer's feed-forward and the fusion run where it scores
        # (skipping the text lookup and projection of B·L items), unless every layer's output is asked for.
        last_index = mask.sum(dim=1) - 1 if last_position_only and cache_params is None else None  # (B,)
        at_last = last_index is not None and not output_hidden_states and len(self.layers) > 0
        for index, layer in enumerate(self.layers):
            positions = last_index if at_last and index == len(self.layers) - 1 else None
            hidden = layer(hidden, selection, cache, mask, positions)  # (B, L, D), or (B, 1, D) at positions
            all_hidden += (hidden,)
        if last_index is not None:
            input_ids = _at_positions(input_ids, last_index)  # (B, 1)
            hidden = hidden if at_last else _at_positions(hidden, last_index)  # (B, 1, D)
        if self.config.fusion != "none":
            hidden = self.fusion(self.text_features(input_ids), hidden)

        if not return_dict:
            return tuple(v for v in (hidden, all_hidden if output_hidden_states else None, cache) if v is not None)
        return M2RecModelOutput(last_hidden_state=hidden, hidden_states=all_hidden if output_hidden_states else None,
                                cache_params=cache)


class M2RecForSequentialRecommendation(M2RecPreTrainedModel):
    """M2Rec with the scoring head: Y · Vᵀ over the whole catalogue, cross-entropy loss and `recommend`.

    The item vectors V are the item-id embeddings E_id (the paper's head, `item_representation="id"`), or E_id plus
    each item's projected text (`"id+text"`, see [`item_vectors`]). The scorer's id part is tied to the item-id
    embeddings (one copy in model.safetensors).

    `push_to_hub` (inherited from transformers) uploads a loadable repository (config.json with `auto_map`,
    model.safetensors and the remote-code files) but with a generic model card and without the item-id mapping or
    the run's metrics; publish trained models with `m2rec-push`, which adds them, writes the card from the run's
    metrics and verifies a fresh offline load before uploading.
    """

    _tied_weights_keys = {"item_scorer.weight": "m2rec.item_embeddings.weight"}

    def __init__(self, config: M2RecConfig):
        super().__init__(config)
        self.m2rec = M2RecModel(config)
        self.item_scorer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.seen_item_offset = None
        if config.seen_item_bias:
            self.seen_item_offset = nn.Parameter(torch.zeros(()))
            self.seen_item_offset._no_weight_decay = True  # decay would pull it back to the paper's scorer
        # Each item's training count, for the sampled softmax's "popularity" sampler (`set_item_counts`). A plain
        # attribute, not a buffer: it describes the training data, not the model, and is not saved with it.
        self.item_counts = None
        self.post_init()

    def get_input_embeddings(self):
        return self.m2rec.item_embeddings

    def set_input_embeddings(self, value):
        self.m2rec.item_embeddings = value

    def get_output_embeddings(self):
        return self.item_scorer

    def set_output_embeddings(self, value):
        self.item_scorer = value

    def set_text_embeddings(self, text_embeddings: torch.Tensor) -> None:
        """See [`M2RecModel.set_text_embeddings`]; growing the catalogue grows the tied scorer too."""
        self.m2rec.set_text_embeddings(text_embeddings)
        self._tie_scorer()

    def set_item_counts(self, item_counts: torch.Tensor) -> None:
        """Each item's training count, (I,) with row 0 (padding) ignored, for `negative_sampler="popularity"` (which
        draws item i with probability ∝ count + 1). Not saved with the model: set it again after loading it to
        continue training."""
        item_counts = torch.as_tensor(item_counts)
        if item_counts.shape != (self.config.vocab_size,):
            raise ValueError(f"item_counts must have shape ({self.config.vocab_size},) (num_items + 1, row 0 for "
                             f"padding), got {tuple(item_counts.shape)}")
        bad = ~torch.isfinite(item_counts.double()) | (item_counts < 0)
        if bad.any():
            item = bad.nonzero()[0].item()
            raise ValueError(f"item_counts[{item}] = {item_counts[item].item()}: counts must be finite and >= 0")
        self.item_counts = item_counts.double()

    @torch.no_grad()
    def add_items(self, tokenizer, items, texts=None, text_embeddings: torch.Tensor | None = None,
                  batch_size: int = 64, device: str | None = None) -> torch.LongTensor:
        """Adds new items to the catalogue by their raw ids, with their text or its embeddings, and returns their
        model ids (C,): num_items + 1, ... in the order given. The text buffer, the item-id embeddings, the tied scorer
        and the item vocabulary `tokenizer` (an [`M2RecItemTokenizer`], changed in place) grow together; save both
        with `save_pretrained` to keep them. Under `item_representation="id+text"` a new item's id part starts at
        zero, so it is scored by its text until trained; under `"id"` it starts random, as `resize_catalogue` makes it.

        Args:
            tokenizer: this model's item vocabulary.
            items: C new raw ids (str or int).
            texts: C texts, each a string (the item's rendered text) or a mapping of its fields, rendered with the
                config's `text_template` (or its `text_columns` joined with ", "); encoded with the config's
                `text_encoder` (sentence-transformers), normalised when `text_normalize`.
            text_embeddings: (C, text_embedding_dim) instead of `texts`, made as the model's own were.
            batch_size, device: the encoder's.
        Raises:
            ValueError: ids given twice or already known, a tokenizer of another catalogue size, an empty text, a
                width other than `text_embedding_dim`, no recorded encoder (pass `text_embeddings` then), a model
                without text (`fusion="none"`). Nothing changes when it raises.
        """
        config = self.config
        if config.fusion == "none":
            raise ValueError("this model was built with fusion='none' and has no item text; grow its catalogue with "
                             "resize_catalogue (and the tokenizer with tokenizer.add_items)")
        if tokenizer.num_items != config.num_items:
            raise ValueError(f"the tokenizer knows {tokenizer.num_items} items and the model {config.num_items}: pass "
                             f"the tokenizer saved with this model")
        raw_ids = tokenizer.check_new_items(items)
        if (texts is None) == (text_embeddings is None):
            raise ValueError("give the new items' texts or their text_embeddings (one of the two)")
        if texts is not None:
            text_embeddings = self._encode_item_texts(raw_ids, texts, batch_size, device)
        if not isinstance(text_embeddings, torch.Tensor) or not text_embeddings.is_floating_point():
            raise ValueError(f"text_embeddings must be a floating-point tensor, got "
                             f"{getattr(text_embeddings, 'dtype', type(text_embeddings))}")
        expected = (len(raw_ids), config.text_embedding_dim)
        if tuple(text_embeddings.shape) != expected:
            raise ValueError(f"text_embeddings must have shape {expected} (new items, text_embedding_dim), got "
                             f"{tuple(text_embeddings.shape)}")
        old_text = self.m2rec.text_embeddings
        self.set_text_embeddings(torch.cat([old_text, text_embeddings.to(old_text.device, old_text.dtype)]))
        return torch.tensor(tokenizer.add_items(raw_ids), device=old_text.device)

    def _encode_item_texts(self, raw_ids: list[str], texts, batch_size: int, device: str | None) -> torch.Tensor:
        """(C, E) embeddings of the new items' texts (strings or field mappings) by the config's recipe."""
        config = self.config
        if isinstance(texts, (str, bytes, Mapping)) or len(texts) != len(raw_ids):
            raise ValueError(f"texts must be a list of {len(raw_ids)} texts (strings or field mappings), one per new "
                             f"item, got {type(texts).__name__}"
                             f"{'' if isinstance(texts, (str, bytes, Mapping)) else f' of {len(texts)}'}")
        rendered = [format_item_text(text, config.text_columns, config.text_template) if isinstance(text, Mapping)
                    else str(text).strip() for text in texts]
        empty = [raw for raw, text in zip(raw_ids, rendered) if not text]
        if empty:
            raise ValueError(f"new items without text: {empty[:10]} (an item's text embedding is what scores it "
                             f"before any interaction)")
        if not config.text_encoder:
            raise ValueError("this model's config records no text_encoder, so new texts cannot be encoded as its own "
                             "were: pass text_embeddings made with the encoder that made the model's, or set "
                             "model.config.text_encoder (and text_template) to it")
        encoded = encode_texts(rendered, config.text_encoder, normalize=config.text_normalize,
                               batch_size=batch_size, device=device)  # (C, E')
        if encoded.shape[1] != config.text_embedding_dim:
            raise ValueError(f"the text encoder {config.text_encoder!r} gives {encoded.shape[1]}-d vectors but this "
                             f"model's text is {config.text_embedding_dim}-d: config.text_encoder is not the encoder "
                             f"that made the model's text embeddings")
        return encoded

    def resize_catalogue(self, num_items: int) -> None:
        """See [`M2RecModel.resize_catalogue`]; the tied scorer follows."""
        self.m2rec.resize_catalogue(num_items)
        self._tie_scorer()

    def _tie_scorer(self) -> None:
        """Rebuilds the scorer on the item embeddings after they were replaced by a new catalogue size."""
        if self.item_scorer.weight is not self.m2rec.item_embeddings.weight:
            self.item_scorer = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False,
                                         device=self.item_scorer.weight.device, dtype=self.item_scorer.weight.dtype)
            self.item_scorer.weight = self.m2rec.item_embeddings.weight

    def score(self, user_states: torch.Tensor, seen_items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores over all items, (B, L, D) → (B, L, I) or (B, D) → (B, I); the padding column gets the dtype's lowest
        value.

        seen_items: (B, L') the input items (0 padding), which get the learned seen-item offset when the config has
            `seen_item_bias`: at position t the items up to t, or all of them for (B, D) states.
        """
        if self.config.item_representation == "id":
            logits = self.item_scorer(user_states)  # a module call, which offloading hooks see
        else:
            logits = F.linear(user_states, self.item_vectors("the id+text scores"))
        if self.seen_item_offset is not None and seen_items is not None:
            logits = add_seen_item_offset(logits, seen_items, self.seen_item_offset)
        logits[..., 0] = torch.finfo(logits.dtype).min
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        last_position_only: bool = False,
        return_logits: bool = True,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_params: M2RecCache | None = None,
        use_cache: bool = False,
        output_attentions: bool | None = None,
    ) -> M2RecRecommendationOutput | tuple:
        """
        Args:
            input_ids: (B, L) item ids, right-padded with 0. With `cache_params`, (B, 1): each user's new event.
            attention_mask: (B, L), 1 for real items; derived from `input_ids` when omitted.
            labels: the next item to predict. (B, L) trains every position (labels[b, t] is the item after position t,
                −100 where there is none); (B,) trains the last real position only. `fft_mode="global"` accepts only
                (B,): its filter shows every position the whole sequence, so earlier positions would see their target.
            last_position_only: return logits (B, I) at each sequence's last real item instead of (B, L, I).
            return_logits: set False during training to skip the (B, L, I) logits; the loss is then computed only at
                labelled positions, which saves the memory of the padding positions.
            cache_params, use_cache: continue a [`M2RecCache`] by one event per user, or return a new one (see
                [`M2RecModel.forward`]); the output's `cache_params` holds it.
            output_attentions: see [`M2RecModel.forward`] (True is refused; no other keyword is taken).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            if labels.dim() == 2 and self.config.fft_mode == "global":
                raise ValueError("fft_mode='global' lets every position see later items, so it cannot be trained on "
                                 "every position: pass labels of shape (batch,) for the last position (each prefix a "
                                 "sample), or use fft_mode='causal'")
            if labels.shape not in (input_ids.shape, input_ids.shape[:1]):
                raise ValueError(f"labels must have shape {tuple(input_ids.shape)} (every position) or "
                                 f"{tuple(input_ids.shape[:1])} (last position), got {tuple(labels.shape)}")
            bad = (labels != -100) & ((labels < 1) | (labels > self.config.num_items))
            if not torch.compiler.is_compiling() and bad.any():  # a value check: eager only, see _validate_inputs
                where = bad.nonzero()[0].tolist()
                raise ValueError(f"label {labels[tuple(where)].item()} at {tuple(where)} is not an item id in "
                                 f"1..{self.config.num_items} (use -100 for positions without a target)")

        fuse_last_only = last_position_only and (labels is None or labels.dim() == 1)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        # A tuple, not M2RecModelOutput: building the dataclass took 2 % of a batch-1 recommendation.
        outputs = self.m2rec(input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                             return_dict=False, last_position_only=fuse_last_only, cache_params=cache_params,
                             use_cache=use_cache, output_attentions=output_attentions)
        user_states = outputs[0]  # (B, L, D), or (B, 1, D) when fused at the last position only
        hidden_states = outputs[1] if output_hidden_states else None
        cache = outputs[-1] if use_cache or cache_params is not None else None
        if fuse_last_only:
            last_states = user_states[:, 0]
        else:
            mask = input_ids != 0 if attention_mask is None else attention_mask.bool()
            last_index = mask.sum(dim=1) - 1  # (B,)
            last_states = user_states[torch.arange(len(input_ids), device=input_ids.device), last_index]  # (B, D)

        # The items each scored position has seen: the inputs, or with a cache its window of recent items.
        seen_items = None
        if self.seen_item_offset is not None or (labels is not None and self.config.loss_excludes_history):
            seen_items = (cache.item_ids if cache_params is not None
                          else input_ids if attention_mask is None else input_ids * attention_mask.bool())

        loss = None
        if labels is not None:
            sampled = self.config.loss == "sampled_softmax"
            loss = next_item_loss(user_states, last_states, self.item_vectors("the loss (labels)"), labels,
                                  seen_items, self.seen_item_offset,
                                  negative_sampler=self.config.negative_sampler if sampled else None,
                                  num_negatives=self.config.num_negatives, item_counts=self.item_counts,
                                  negative_sharing=self.config.negative_sharing,
                                  exclude_seen=self.config.loss_excludes_history)

        logits = None
        if return_logits:
            logits = self.score(last_states if last_position_only else user_states, seen_items)

        if not return_dict:
            return tuple(v for v in (loss, logits, user_states, hidden_states, cache) if v is not None)
        return M2RecRecommendationOutput(loss=loss, logits=logits, last_hidden_state=user_states,
                                         hidden_states=hidden_states, cache_params=cache)

    @torch.no_grad()
    def user_embeddings(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                        cache_params: M2RecCache | None = None) -> torch.FloatTensor:
        """Each history's representation after its last item, (B, D), without gradient, for an inner-product index
        over [`item_embeddings`]: `user_embeddings(h) @ item_embeddings(ids).T` equals
        `next_item_scores(h, candidates=ids)` except for the seen-item offset. The offset (config `seen_item_bias`)
        depends on the history, not on the user vector, so no fixed item vector can carry it: with it, retrieve
        `k + L` items (L = the input's `input_ids.shape[1]`) from the index and re-rank them with
        `recommend(..., candidates=retrieved)`, which adds it. That gives exactly `recommend`'s top k when the offset
        is ≤ 0 (a penalty: it learns about −3 on ML-1M) or with `exclude_seen=True`: at most L retrieved items are
        seen, so ≥ k unseen ones remain, and every item outside the retrieved set scores no more than they do. (A
        positive offset can lift a seen item from outside the retrieved set: add the history's items to the
        candidates then.)

        Args: as [`recommend`]'s `input_ids`, `attention_mask`, `cache_params` (continued in place).
        """
        return self(input_ids, attention_mask=attention_mask, last_position_only=True, return_logits=False,
                    cache_params=cache_params).last_hidden_state[:, 0]

    def item_embeddings(self, item_ids: torch.LongTensor | None = None) -> torch.FloatTensor:
        """The scorer's item vectors, without gradient, for an index: (C, D) for item_ids (C,) in 1..num_items, or for
        every item 1..num_items, (num_items, D), row r being item r + 1 (padding is left out: its zero vector would
        outrank every negative score in an index). See [`user_embeddings`]."""
        weight = self.item_vectors("item_embeddings()").detach()  # (I, D)
        return weight[1:] if item_ids is None else weight[self._item_ids(item_ids, "item_ids", weight.device)]

    def next_item_scores(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                         candidates: torch.LongTensor | None = None,
                         cache_params: M2RecCache | None = None) -> torch.FloatTensor:
        """Scores of the next item after each history: (B, I) over the whole catalogue, the padding column 0 at the
        dtype's lowest value (the logits at the last position); or (B, C) over `candidates`, item ids in
        1..num_items, (C,) for every history or (B, C) per history. The seen-item offset is included, as in
        [`score`]. Args as [`recommend`]."""
        scores = self(input_ids, attention_mask=attention_mask, last_position_only=True, cache_params=cache_params,
                      return_dict=False)[0]  # (B, I): without labels, the logits come first
        if candidates is None:
            return scores
        # A gather from the full scores, not a product with the candidates' vectors: one code path for the scores
        # and the seen-item offset, and for a batch the (B, I) product costs little more than (B, C) gathered rows.
        return scores.gather(1, self._item_ids(candidates, "candidates", scores.device, batch_size=len(scores)))

    def item_vectors(self, purpose: str = "item_vectors()") -> torch.Tensor:
        """The scorer's item vectors V (I, D), row i for item i, that every score is a dot product with (logits, loss,
        [`item_embeddings`], `recommend`, the cached step): E_id under `item_representation="id"`, and
        `E_id + LayerNorm(text_proj(E_text))` under `"id+text"`. Read outside a module call, they see no offloading
        hook, so while the weights are offloaded (on the meta device) they would be a placeholder: refused, naming
        `purpose`."""
        weight = self.item_scorer.weight
        if self.config.item_representation == "id+text":
            weight = weight + self.m2rec.item_text_vectors()
        if weight.device.type == "meta":
            raise ValueError(f"{purpose} reads the item table directly, but this model's weights are offloaded "
                             f"(device_map with CPU or disk offload), where only forward calls load them: load the "
                             f"model without offloading for it (offloaded, a model with item_representation='id' "
                             f"scores and recommends)")
        return weight

    def _item_ids(self, item_ids, name: str, device: torch.device, batch_size: int | None = None,
                  allow_padding: bool = False) -> torch.LongTensor:
        """item_ids as a long tensor on `device` (the inputs' or the scores': an offloaded model's own device is the
        meta device), checked to be item ids 1..num_items (0..num_items with
        allow_padding); the error names the first offending id. Without batch_size: (C,). With it: (C,) for every
        history or (batch_size, C) per history, returned as (batch_size, C)."""
        item_ids = torch.as_tensor(item_ids, device=device)
        dims = (1,) if batch_size is None else (1, 2)
        if item_ids.dim() not in dims or item_ids.is_floating_point() or item_ids.numel() == 0:
            shapes = "(C,)" if batch_size is None else f"(C,) or ({batch_size}, C)"
            raise ValueError(f"{name} must be a non-empty integer tensor of shape {shapes}, got {item_ids.dtype} of "
                             f"shape {tuple(item_ids.shape)}")
        lowest = 0 if allow_padding else 1
        bad = (item_ids < lowest) | (item_ids > self.config.num_items)
        if bad.any():
            raise ValueError(f"{name} holds {item_ids[bad][0].item()}, which is not an item id in "
                             f"{lowest}..{self.config.num_items}{' (0 is padding)' if allow_padding else ''}")
        if batch_size is None:
            return item_ids.long()
        if item_ids.dim() == 2 and len(item_ids) != batch_size:
            raise ValueError(f"{name} has {len(item_ids)} rows for {batch_size} histories; give one row per history, "
                             f"or a 1-D tensor for all of them")
        return item_ids.long().expand(batch_size, -1) if item_ids.dim() == 1 else item_ids.long()

    @torch.no_grad()
    def recommend(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 10,
        exclude_seen: bool = False,
        cache_params: M2RecCache | None = None,
        candidates: torch.LongTensor | None = None,
        exclude_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """Top-k next items for each history, best first.

        Args:
            input_ids: (B, L) histories, right-padded with 0 (oldest item first); with `cache_params`, (B, 1): each
                user's new event.
            k: how many items to return, at most `num_items` (at most C with `candidates`).
            exclude_seen: drop the items of the input from the ranking, as evaluation's `exclude_history` does when
                `input_ids` holds the whole history. The input holds at most `max_len` items (with a cache, its last
                `max_len` items, as many as a history passed whole can hold): for a longer history, pass all of it
                as `exclude_ids` to exclude what evaluation excludes.
            cache_params: an [`M2RecCache`] that `input_ids` continues (in place) before the ranking.
            candidates: rank only these item ids (1..num_items): (C,) for every history or (B, C) per history.
            exclude_ids: item ids to drop from the ranking, (E,) for every history or (B, E) per history, 0 as
                padding.
        Returns:
            `(item_ids, scores)`, both (B, k). Never contains the padding id 0; excluded items rank after all others
            (so they appear only if k exceeds the items left).

        A catalogue of more than `TOP_K_CHUNK_ITEMS` (65,536) items is ranked in chunks of that many items with a
        running top k (`kernels.top_k_items`), so memory stays O(B × 65,536) for 10^6 items and more; each chunk is
        scored in bfloat16 where the device has it natively (AVX512-BF16 or AMX CPUs, CUDA) and the items that
        could still make the top k are scored again in float32: the same items and scores as the float32 ranking,
        up to ties.
        """
        if candidates is not None:
            candidates = self._item_ids(candidates, "candidates", input_ids.device, batch_size=len(input_ids))  # (B, C)
        num_ranked = self.config.num_items if candidates is None else candidates.shape[1]
        if not 1 <= k <= num_ranked:
            raise ValueError(f"k must be between 1 and {num_ranked} (the "
                             f"{'catalogue' if candidates is None else 'candidates'}), got {k}")
        weight = self.item_scorer.weight
        if candidates is None and self.config.vocab_size > TOP_K_CHUNK_ITEMS and weight.device.type != "meta":
            return self._recommend_in_chunks(input_ids, attention_mask, k, exclude_seen, cache_params, exclude_ids)
        scores = self.next_item_scores(input_ids, attention_mask, cache_params=cache_params).float()  # (B, I)
        excluded = self._excluded_items(input_ids, attention_mask, exclude_seen, cache_params, exclude_ids,
                                        scores.device)
        for item_ids in excluded:
            scores.scatter_(1, item_ids, torch.finfo(scores.dtype).min)
        if excluded:  # padding below every excluded item, so it is never returned (it is already below the rest)
            scores[:, 0] = float("-inf")
        if candidates is None:
            top_scores, top_items = scores.topk(k, dim=1)
            return top_items, top_scores
        top_scores, top_columns = scores.gather(1, candidates).topk(k, dim=1)
        return candidates.gather(1, top_columns), top_scores

    def _excluded_items(self, input_ids, attention_mask, exclude_seen, cache_params, exclude_ids, device):
        """The item ids `recommend` drops from the ranking: a list of (B, E) tensors, 0 as padding."""
        excluded = []
        if exclude_seen:
            if cache_params is not None:
                excluded.append(cache_params.item_ids)
            else:
                excluded.append(input_ids if attention_mask is None else input_ids * attention_mask.long())
        if exclude_ids is not None:
            excluded.append(self._item_ids(exclude_ids, "exclude_ids", device, batch_size=len(input_ids),
                                           allow_padding=True))
        return excluded

    def _recommend_in_chunks(self, input_ids, attention_mask, k, exclude_seen, cache_params, exclude_ids):
        """`recommend` over the whole catalogue with memory bounded by TOP_K_CHUNK_ITEMS (see there)."""
        outputs = self(input_ids, attention_mask=attention_mask, last_position_only=True, return_logits=False,
                       cache_params=cache_params)
        user_states = outputs.last_hidden_state[:, 0]  # (B, D)
        offset_items = offset_values = None
        if self.seen_item_offset is not None:  # the items `score` gives the offset, each once
            mask = input_ids != 0 if attention_mask is None else attention_mask.bool()
            offset_items = first_occurrences(outputs.cache_params.item_ids if cache_params is not None
                                             else input_ids * mask)
            offset_values = self.seen_item_offset.float().expand(offset_items.shape)
        excluded = self._excluded_items(input_ids, attention_mask, exclude_seen, cache_params, exclude_ids,
                                        user_states.device)
        top_scores, top_items = top_k_items(
            user_states, self.item_vectors("recommend"), k, chunk_size=TOP_K_CHUNK_ITEMS,
            bf16=bf16_scoring_supported(user_states.device), offset_items=offset_items, offset_values=offset_values,
            excluded_items=torch.cat(excluded, dim=1) if excluded else None)
        return top_items, top_scores


M2RecForSequentialRecommendation.register_for_auto_class("AutoModel")
