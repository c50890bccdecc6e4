"""The one attention interface every variant implements, and the block layout they share.

An attention module receives already-projected queries, keys and values and decides who
attends to whom and how. The encoder owns projections, residuals, norms, MLPs and positions.

    out_BxLxHxD = module(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=None)

``mask_BxL`` is True at real tokens and False at padding. Outputs at padded query positions
may be anything finite; outputs at real positions must not depend on padded keys/values.
``rng`` is a PRNG key during training (None at evaluation) for variants that draw
randomness per step (e.g. Performer feature redraw); deterministic variants ignore it.
``bias`` (only for variants with ``supports_distance_bias``) is a `DistanceBias`: a per-head
offset added to the score of query i and key j as a function of i - j alone (None = off).

Shape letters. A name ends in its shape, one capital letter per axis joined by x
(``q_BxLxHxD``); a digit is a literal size or a factor (``keys_2``, ``k_Ex2L``), and a lowercase
x at either end stands for any further axes (``scores_xQxW``, ``x_BxLx``). One meaning each:

    B  batch                          L  sequence positions (the queries)
    H  heads                          D  head dim
    E  model width, H * D (the channels a token mixer sees)
    M  positions of a second sequence: keys of another length, Nystrom's landmarks, Sparse's
       gathered summary keys, Transformer-XL's pooled memory, Synthesizer's max_len columns
    P  L padded to a whole number of blocks
    N  blocks an axis is cut into (blocks, chunks, segments)
    S  positions in one block
    W  keys one query block sees (its window)
    G  global positions
    Q  query rows of a shape-generic kernel (a block's S, the G global rows, ...)
    K  a variant's own inner width, set by its config: Linformer's k rows, Performer's random
       features, Reformer's n_buckets / 2, Nystrom's conv taps, a recurrence's state (LSTM
       hidden units per direction, S4D / LRU states)
    C  directions of a recurrence (forward, backward)
    F  frequencies of a sinusoid (RoPE, Transformer-XL's relative positions)
    R  Reformer's hash rounds
    T  BigBird's middle query blocks, N - 2
    A  BigBird's random key blocks per middle block
    U  Transformer-XL's distinct query-key distances
    I, J  the two parts of an axis split in two when no letter above names them (J alone:
       the inner part, e.g. Sparse's c summary slots per block)

Parameters are saved under their names, so those keep the letters they were trained with:
S4D's and LRU's parameters call their state axis N (K here), as their papers do.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.softmax import DROP_STREAM, ProbDropout


class Buffer(nnx.Variable):
    """A fixed, non-trained array (random projections, sampled block indices)."""


class SSMParam(nnx.Param):
    """A recurrence parameter of a state-space / linear-recurrent mixer (S4D's dt and A, LRU's
    nu, theta, gamma). The trainer puts these in their own optimizer group, as the S4 and LRU
    papers do: peak learning rate `train.ssm_lr` and no weight decay (decay would shrink them
    towards 0, i.e. shorten every memory: LRU's |lambda| 0.999 -> 0.963 under LRA text's wd)."""


class NoDecayParam(nnx.Param):
    """A parameter the trainer exempts from weight decay at the base learning rate (its own
    "no_decay" optimizer group): the PyTorch references' `p._no_weight_decay = True` (Mamba's
    skip D), or a parameter with a penalty of its own (adaptive span's z, under its L1 term).
    Decay would pull it towards 0 for no modelling reason: D = 0 removes the skip."""


class AuxLoss(nnx.Variable):
    """A term a module adds to the training loss: `self.sow(AuxLoss, name, value)` during its
    call (a scalar, e.g. adaptive span's L1 span penalty). The trainer adds the sum of every
    sown AuxLoss to the cross-entropy it differentiates; the reported `loss` stays the
    cross-entropy, the sum is reported as `aux_loss`. Evaluation ignores them."""


@dataclasses.dataclass
class AttentionConfig:
    """Fields every variant's config has; variants subclass this with their own fields."""

    kind: str = "dense"
    # Attention-probability dropout rate during training (0 = off, the papers' and this
    # harness's default; LRA's code used 0.1). Only for variants with `prob_dropout`.
    dropout: float = 0.0

    def pattern(self, seq_len: int) -> dict:
        """The fields `patterns=L<seq_len>` sets: block, window, segment or projection sizes
        scaled so that no pattern covers the whole sequence at that length (the defaults are the
        papers', sized for 1K-4K). lra.config registers them as the config
        `patterns_model/L<seq_len>/<kind>`, so a command-line override still wins. None here:
        dense, kernel and recurrent variants have no pattern sizes."""
        return {}


class DistanceBias:
    """A per-head offset to the score of query i and key j that depends on i - j only (a
    relative-position bias). The encoder makes it (ALiBi: models/posenc.py); a variant only
    asks it for the distances its scores cover, in their own layout. Its numbers are constants
    of the model, not trained: the fused kernels (flash, dense's explicit form) pass it no
    gradient."""

    def per_head(self, distance_Hx: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Offsets [H, ...] for distances [1 or H, ...] (1: the same distances for every head)."""
        raise NotImplementedError

    def __call__(self, distance: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Offsets [H, *distance.shape] for distances every head shares."""
        return self.per_head(distance[None], dtype)


class Attention(nnx.Module):
    """Base class. Subclasses set ``config_cls``, implement ``__call__`` and, if they hold
    parameters or buffers, ``init_variables``."""

    config_cls: ClassVar[type[AttentionConfig]] = AttentionConfig
    # Reformer shares the query and key projection: the encoder then passes k = q.
    shared_qk: ClassVar[bool] = False
    # True for variants whose output equals dense softmax under `reference_mask`.
    exact_pattern: ClassVar[bool] = False
    # True for variants allowed to build an L x L array (dense, synthesizer).
    quadratic: ClassVar[bool] = False
    # True for token mixers without projections (TokenMixer): the encoder passes the block's
    # normalised input x as v (reshaped to BxLxHxD) and uses the output as is.
    mixer: ClassVar[bool] = False
    # True for variants that form explicit per-pair scores and can add a `DistanceBias` to them
    # (they accept `bias`); kernel/low-rank/hashing variants never see a (query, key) pair.
    supports_distance_bias: ClassVar[bool] = False
    # False for non-mixers whose scores are not q.k dot products (RoPE has nothing to rotate).
    supports_rope: ClassVar[bool] = True
    # Whether the module reads q and k at all (set per instance: a synthesizer's logits come from
    # its own weights). The encoder creates no projection that nothing reads: an unread
    # projection would be counted as parameters and decayed while its gradient is always 0.
    reads_queries: bool = True
    reads_keys: bool = True
    # True for variants that form softmax probabilities and implement `model.attention.dropout`
    # on them. Kernel, low-rank-kernel and recurrent mixers never form them.
    prob_dropout: ClassVar[bool] = False
    # lra.check / the registry-driven tests: small-but-real config fields (lengths are multiples
    # of 16, up to 128), and for the memory-growth check its own fields and the exponent limit.
    # `growth_lengths`: the two lengths the growth exponent is measured between; a variant whose
    # cost has a fixed part (BigBird's global blocks) measures where that part is small.
    check_settings: ClassVar[dict] = {}
    growth_settings: ClassVar[dict] = {}
    growth_limit: ClassVar[float] = 1.2
    growth_lengths: ClassVar[tuple[int, int]] = (256, 1024)

    def __init__(self, cfg: AttentionConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        # The one place a config is validated: models.build and a direct construction both
        # come through here, before anything is allocated.
        self.check_dropout(cfg)
        self.check_seq_len(cfg, max_len)
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.init_variables(rngs)

    def init_variables(self, rngs: nnx.Rngs) -> None:
        """Create the variant's parameters and buffers from `rngs` (cfg, num_heads, head_dim
        and max_len are set). Default: none."""

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 bias: DistanceBias | None = None) -> jax.Array:
        raise NotImplementedError

    def summary(self) -> dict:
        """What a trained module reports in result.json's `model_summary` (host-side, after
        training, with the best-val parameters; e.g. adaptive span's learned spans). Plain
        floats / lists / dicts. Default: nothing."""
        return {}

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only: bool[B, H, L, L], who may attend to whom (exact-pattern variants)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact dense pattern")

    @classmethod
    def check_seq_len(cls, cfg: AttentionConfig, seq_len: int) -> None:
        """Raise ValueError with a one-line fix when `cfg` is invalid or cannot work at
        `seq_len` (called once, when a module is built for that length)."""

    @classmethod
    def tie_layers(cls, modules: list["Attention"]) -> None:
        """Called by the encoder with every layer's module (first layer first): variants with
        cross-layer parameter sharing (Linformer's layerwise E) make later layers reference
        the first layer's Variables. Default: nothing shared."""

    @classmethod
    def check_dropout(cls, cfg: AttentionConfig) -> None:
        rate = getattr(cfg, "dropout", 0.0)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"model.attention.dropout={rate} must be in [0, 1)")
        if rate > 0.0 and not cls.prob_dropout:
            raise ValueError(f"model.attention.dropout={rate}: {cfg.kind} forms no attention "
                             f"probabilities to drop; set model.attention.dropout=0 (use "
                             f"model.dropout for the residual dropout)")

    def drop(self, rng: jax.Array | None) -> ProbDropout | None:
        """This step's `ProbDropout`, or None at evaluation or at rate 0."""
        rate = getattr(self.cfg, "dropout", 0.0)
        if rng is None or rate == 0.0:
            return None
        keys_2 = jax.random.bits(jax.random.fold_in(rng, DROP_STREAM), (2,), jnp.uint32)
        return ProbDropout(keys_2, float(rate))


def causal_switch(cfg: AttentionConfig) -> tuple[str, bool] | None:
    """The field and value that select a variant's causal form (`bidirectional=False`, or
    `causal=True`), or None when its config has neither: no causal form here."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "bidirectional" in fields:
        return "bidirectional", False
    if "causal" in fields:
        return "causal", True
    return None


def check_choice(cfg: AttentionConfig, field: str, choices: tuple[str, ...]) -> None:
    """A config field that names one of `choices`: ValueError naming them, in one line."""
    value = getattr(cfg, field)
    if value not in choices:
        raise ValueError(f"model.attention.{field}={value!r}; use one of {', '.join(choices)}")


class ExactSoftmax(Attention):
    """Softmax over explicit scores of a fixed (query, key) pattern: it equals masked dense
    softmax under `reference_mask`, forms probabilities to drop and knows each score's
    distance, so it takes a `DistanceBias`."""

    exact_pattern = True
    prob_dropout = True
    supports_distance_bias = True


class TokenMixer(Attention):
    """A mixer without projections or scores (FNet, recurrences): it maps the block's
    normalised input x [B, L, E] (passed as v, split into heads) to [B, L, E] in `mix`."""

    mixer = True

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def mix(self, x_BxLxE: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        b, length, h, d = v_BxLxHxD.shape
        return self.mix(v_BxLxHxD.reshape(b, length, h * d), mask_BxL).reshape(b, length, h, d)


# ------------------------------------------------------------------------ block layout
# Blocked variants cut the sequence into N blocks of S positions and batch every einsum over
# (B, H, N): pad to a multiple of S, move heads before the blocks, and back.


def pad_to_blocks(size: int, mask_BxL: jax.Array, *xs_BxLx: jax.Array) -> list[jax.Array]:
    """[mask_BxP, *xs_BxPx]: the length axis (axis 1) padded to a multiple of `size`, the
    padding masked out."""
    pad = (-mask_BxL.shape[1]) % size
    if pad == 0:
        return [mask_BxL, *xs_BxLx]
    return [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (mask_BxL, *xs_BxLx)]


def blocks_head_major(x_BxPxHxD: jax.Array, size: int) -> jax.Array:
    """[B, N*S, H, D] -> [B, H, N, S, D] (S = size)."""
    b, padded, h, d = x_BxPxHxD.shape
    return x_BxPxHxD.reshape(b, padded // size, size, h, d).transpose(0, 3, 1, 2, 4)


def unblock_head_major(x_BxHxNxSxD: jax.Array) -> jax.Array:
    """[B, H, N, S, D] -> [B, N*S, H, D], the inverse of `blocks_head_major`."""
    b, h, n, s, d = x_BxHxNxSxD.shape
    return x_BxHxNxSxD.transpose(0, 2, 3, 1, 4).reshape(b, n * s, h, d)


def neighbour_blocks(x: jax.Array, axis: int, width: int = 1) -> jax.Array:
    """Blocks n - width .. n + width (block axis `axis`) side by side along axis + 1, zeros
    (False) beyond the ends: the keys, values or key mask of every query block's window."""
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (width, width)
    padded = jnp.pad(x, widths)
    shifted = [jax.lax.slice_in_dim(padded, start, start + n, axis=axis)
               for start in range(2 * width + 1)]
    return jnp.concatenate(shifted, axis=axis + 1)


# ------------------------------------------------------------------------ registry
# kind -> Attention subclass, filled by @register (the built-in variants when models.attention is
# imported; a plugin's when its module is imported, see lra.plugins).
REGISTRY: dict[str, type[Attention]] = {}


def register(cls: type[Attention]) -> type[Attention]:
    """Class decorator: make an Attention subclass available as `model.attention.kind=<kind>`
    and as `model=<kind>` (the kind is its config dataclass's `kind` default; a complete
    example is examples/my_attention.py)."""
    if not (isinstance(cls, type) and issubclass(cls, Attention)):
        raise TypeError(f"@register expects an Attention subclass, got {cls!r}")
    config_cls = cls.config_cls
    if config_cls is AttentionConfig or not dataclasses.is_dataclass(config_cls) \
            or not issubclass(config_cls, AttentionConfig):
        raise TypeError(f"{cls.__name__}.config_cls must be its own AttentionConfig dataclass")
    kind = config_cls().kind
    if not kind or not kind.replace("_", "").isalnum():
        raise ValueError(f"{config_cls.__name__}.kind={kind!r}: give it a name of letters, "
                         f"digits and underscores")
    known = REGISTRY.get(kind)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"attention kind {kind!r} is already registered by "
                         f"{known.__module__}.{known.__qualname__}")
    REGISTRY[kind] = cls
    return cls
