"""The one attention interface every variant implements.

An attention module receives already-projected queries, keys and values and decides who
attends to whom and how. The encoder owns projections, residuals, norms and MLPs.

    out_BxLxHxD = module(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=None)

``mask_BxL`` is True at real tokens and False at padding. Outputs at padded query positions
may be anything finite; outputs at real positions must not depend on padded keys/values.
``rng`` is a PRNG key during training (None at evaluation) for variants that draw
randomness per step (e.g. Performer feature redraw); deterministic variants ignore it.
``alibi_H`` (only for variants with ``supports_alibi``) are per-head ALiBi slopes m_h: every
score of query i and key j gets -m_h * |i - j| before the softmax (None = off).

Attention-probability dropout (``model.attention.dropout``, LRA's ``attention_dropout_rate``):
variants that form softmax probabilities (``prob_dropout = True``) drop each probability with
that rate during training (rows are not renormalised: inverted dropout, as in the usual
``dropout(softmax(S)) @ V``). Masks come from `ProbDropout`, a keyed hash of each probability's
index, so a custom backward regenerates them instead of storing them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG_INF = -1e9  # finite, so fully-masked rows stay NaN-free


class Buffer(nnx.Variable):
    """A fixed, non-trained array (random projections, sampled block indices)."""


class SSMParam(nnx.Param):
    """A recurrence parameter of a state-space / linear-recurrent mixer (S4D's dt and A, LRU's
    nu, theta, gamma). The trainer puts these in their own optimizer group, as the S4 and LRU
    papers do: peak learning rate `train.ssm_lr` and no weight decay (decay would shrink them
    towards 0, i.e. shorten every memory: LRU's |lambda| 0.999 -> 0.963 under LRA text's wd)."""


@dataclasses.dataclass
class AttentionConfig:
    """Fields every variant's config has; variants subclass this with their own fields."""

    kind: str = "dense"
    # Attention-probability dropout rate during training (0 = off, the papers' and this
    # harness's default; LRA's code used 0.1). Only for variants with `prob_dropout`.
    dropout: float = 0.0


def mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser with full avalanche (xorshift-multiply, "lowbias32")."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_bits(keys_2: jax.Array, index: jax.Array) -> jax.Array:
    """uint32 bits of a keyed counter-based hash: mix(mix(index + k0) ^ k1), keys uint32[2]."""
    return mix32(mix32(index + keys_2[0]) ^ keys_2[1])


def drop_threshold(rate: float) -> jax.Array:
    """Bits below this are dropped: P(drop) = rate (to 2^-32)."""
    return jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


class ProbDropout(NamedTuple):
    """One step's attention-probability dropout: hash keys uint32[2] and the rate (static)."""

    keys_2: jax.Array
    rate: float

    def keep_at(self, index: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Inverted-dropout multipliers (0 or 1 / (1 - rate)) for probabilities at `index`."""
        keep = hash_bits(self.keys_2, index) >= drop_threshold(self.rate)
        return jnp.where(keep, jnp.asarray(1.0 / (1.0 - self.rate), dtype), jnp.asarray(0, dtype))

    @staticmethod
    def check_count(size: int) -> None:
        """The hash counts probabilities in uint32: refuse what would wrap around."""
        if size >= 2 ** 32:
            raise ValueError(f"attention dropout over {size} probabilities needs a 64-bit "
                             f"counter; lower the batch size or set model.attention.dropout=0")

    def keep(self, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """Multipliers for an array of probabilities of `shape`, indexed row-major."""
        size = math.prod(shape)
        self.check_count(size)
        return self.keep_at(jax.lax.iota(jnp.uint32, size).reshape(shape), dtype)

    def apply(self, probs: jax.Array) -> jax.Array:
        return probs * self.keep(probs.shape, probs.dtype)

    def piece(self, i: int) -> "ProbDropout":
        """Independent masks for piece i of a softmax split over several arrays (band, global
        columns, ...): keys hashed with the piece number."""
        tag = jnp.uint32(2 * i + 0x9E37)
        return ProbDropout(hash_bits(self.keys_2, jnp.stack([tag, tag + 1])), self.rate)


def drop_piece(weights: jax.Array, drop: ProbDropout | None, i: int) -> jax.Array:
    """`weights` with piece i's dropout applied (the numerator of a softmax split over pieces;
    its row sums stay undropped), or as is when `drop` is None."""
    return weights if drop is None else drop.piece(i).apply(weights)


DROP_STREAM = 0x5D7A  # fold_in tag: the dropout keys never reuse a variant's own random stream


class Attention(nnx.Module):
    """Base class. Subclasses set ``config_cls`` and implement ``__call__``."""

    config_cls: ClassVar[type[AttentionConfig]] = AttentionConfig
    # Reformer shares the query and key projection: the encoder then passes k = q.
    shared_qk: ClassVar[bool] = False
    # True for variants whose output equals dense softmax under `reference_mask`.
    exact_pattern: ClassVar[bool] = False
    # True for variants allowed to build an L x L array (dense, synthesizer).
    quadratic: ClassVar[bool] = False
    # True for token mixers without projections (FNet): the encoder passes the block's
    # normalised input x as v (reshaped to BxLxHxD) and uses the output as is.
    mixer: ClassVar[bool] = False
    # True for variants that form explicit per-pair scores and can add the ALiBi bias to them
    # (they accept `alibi_H`); kernel/low-rank/hashing variants never see a (query, key) pair.
    supports_alibi: ClassVar[bool] = False
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
    check_settings: ClassVar[dict] = {}
    growth_settings: ClassVar[dict] = {}
    growth_limit: ClassVar[float] = 1.2

    def __init__(self, cfg: AttentionConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        self.check_dropout(cfg)
        self.check_seq_len(cfg, max_len)  # every variant validates its pattern at build time
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 alibi_H: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only: bool[B, H, L, L], who may attend to whom (exact-pattern variants)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact dense pattern")

    @classmethod
    def check_seq_len(cls, cfg: AttentionConfig, seq_len: int) -> None:
        """Raise ValueError with a one-line fix when `seq_len` cannot work with `cfg`."""

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


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022, sec. 3): 2^(-8h/H), h = 1..H, for H a power of two.

    Other H: the slopes of the largest power of two n < H, then the first H - n of every other
    slope (1st, 3rd, ...) of the 2n-head sequence, which fall between them (the paper's rule).
    """
    if num_heads < 1:
        raise ValueError(f"alibi needs num_heads >= 1 (got {num_heads})")
    n = 1 << (num_heads.bit_length() - 1)  # largest power of two <= num_heads
    geometric_n = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    if n == num_heads:
        return geometric_n.astype(np.float32)
    geometric_2n = 2.0 ** (-8.0 * np.arange(1, 2 * n + 1) / (2 * n))
    return np.concatenate([geometric_n, geometric_2n[0::2][:num_heads - n]]).astype(np.float32)


def alibi_bias(alibi_H: jax.Array, distance: jax.Array, dtype=jnp.float32) -> jax.Array:
    """-m_h * |i - j| with the head axis first: [H, *distance.shape] (distance = i - j)."""
    slopes_H = alibi_H.astype(dtype).reshape(-1, *([1] * distance.ndim))
    return -slopes_H * jnp.abs(distance).astype(dtype)


def masked_softmax_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                             allowed_BxHxLxM: jax.Array, bias_BxHxLxM: jax.Array | None = None,
                             drop: ProbDropout | None = None) -> jax.Array:
    """The textbook reference: einsum scores, `jax.nn.softmax`, dropout on the probabilities,
    einsum with V, restricted to `allowed` (broadcastable to [B, H, L, M]) with an optional
    additive score bias. Tests compare every exact variant with it;
    `model.attention.impl=reference` trains with it."""
    scale = q_BxLxHxD.shape[-1] ** -0.5
    scores_BxHxLxM = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxD * scale, k_BxMxHxD)
    if bias_BxHxLxM is not None:
        scores_BxHxLxM = scores_BxHxLxM + bias_BxHxLxM
    scores_BxHxLxM = jnp.where(allowed_BxHxLxM, scores_BxHxLxM, NEG_INF)
    probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1)
    if drop is not None:
        probs_BxHxLxM = drop.apply(probs_BxHxLxM)
    return jnp.einsum("bhlm,bmhd->blhd", probs_BxHxLxM, v_BxMxHxD)


def heads_first(x_BxLxHxD: jax.Array) -> jax.Array:
    """[B, L, H, D] -> [B, H, L, D]: batch axes leading, so XLA's CPU dots need no copies."""
    return jnp.swapaxes(x_BxLxHxD, 1, 2)


def softmax_rows(scores_xW: jax.Array, allowed_xW: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax weights exp(s - max) and their row sums [..., 1].

    The row max is a stop-gradient constant (softmax does not depend on it), so autodiff adds no
    pass for it; callers multiply the weights with V first and divide the [.., D] result by the
    sums, which is one pass over the score block fewer forwards and, backwards, turns the
    softmax VJP's row reduction over the block into one over [.., D] (rowsum(dO * O)).
    """
    if allowed_xW is not None:
        scores_xW = jnp.where(allowed_xW, scores_xW, NEG_INF)
    max_x1 = jax.lax.stop_gradient(scores_xW.max(-1, keepdims=True))
    weights_xW = jnp.exp(scores_xW - max_x1)
    return weights_xW, weights_xW.sum(-1, keepdims=True)


_NO_KEYS = np.zeros(2, np.uint32)


def softmax_pv(scores_xQxW: jax.Array, allowed_xQxW: jax.Array, v_xWxD: jax.Array,
               drop: ProbDropout | None = None) -> jax.Array:
    """softmax(scores over allowed keys) @ v for any leading batch axes (blocks, heads, ...),
    normalised after the product with V, with a hand-written VJP (`_softmax_pv_grads`); `drop`
    drops probabilities (index = row-major position in the broadcast [.., Q, W] weights). The
    scores' own gradient (their q, k einsum) is left to autodiff."""
    if drop is None:
        return _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, _NO_KEYS, 0.0)
    return _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, drop.keys_2, drop.rate)


def _keep(keys_2, rate, shape, dtype):
    """Dropout multipliers for `shape`, or None at rate 0 (shared by forward and backward)."""
    return None if rate == 0.0 else ProbDropout(keys_2, rate).keep(shape, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate):
    return _softmax_pv_fwd(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate)[0]


def _softmax_pv_fwd(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate):
    weights_xQxW, sums_xQx1 = softmax_rows(scores_xQxW, allowed_xQxW)
    keep_xQxW = _keep(keys_2, rate, weights_xQxW.shape, weights_xQxW.dtype)
    dropped_xQxW = weights_xQxW if keep_xQxW is None else weights_xQxW * keep_xQxW
    out_xQxD = jnp.einsum("...qw,...wd->...qd", dropped_xQxW, v_xWxD) / sums_xQx1
    # An empty array with the scores' leading shape: the mask may have broadcast them.
    shape_xQx0 = jnp.zeros(scores_xQxW.shape[:-1] + (0,), scores_xQxW.dtype)
    return out_xQxD, (weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, shape_xQx0, keys_2)


def _softmax_pv_grads(weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, dout_xQxD, keep_xQxW=None):
    """Cotangents of the scores and of V for out = ((E * K) @ V) / l, E = exp(S - max),
    l = rowsum E, K the dropout multipliers (None = no dropout): with P = E / l,
    dS = P * (K * dO V^T - rowsum(dO * O)) and dV = (P * K)^T dO, the latter computed as
    [D, Q] x [Q, W] (XLA's CPU dot runs that orientation ~2x faster than contracting the
    block's leading axis directly). rowsum(dO * O) = rowsum(dP * P) holds with dropout too."""
    dout_over_sum_xQxD = dout_xQxD / sums_xQx1
    delta_xQx1 = (dout_over_sum_xQxD * out_xQxD).sum(-1, keepdims=True)
    dprobs_xQxW = jnp.einsum("...qd,...wd->...qw", dout_over_sum_xQxD, v_xWxD)
    if keep_xQxW is not None:
        dprobs_xQxW = dprobs_xQxW * keep_xQxW
        weights_dropped_xQxW = weights_xQxW * keep_xQxW
    else:
        weights_dropped_xQxW = weights_xQxW
    dscores_xQxW = weights_xQxW * (dprobs_xQxW - delta_xQx1)
    dv_xDxW = jnp.einsum("...qd,...qw->...dw", dout_over_sum_xQxD, weights_dropped_xQxW)
    return dscores_xQxW, jnp.swapaxes(dv_xDxW, -1, -2)


def _softmax_pv_bwd(rate, residuals, dout_xQxD):
    weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, shape_xQx0, keys_2 = residuals
    keep_xQxW = _keep(keys_2, rate, weights_xQxW.shape, weights_xQxW.dtype)
    dscores_xQxW, dv_xWxD = _softmax_pv_grads(weights_xQxW, sums_xQx1, v_xWxD, out_xQxD,
                                              dout_xQxD, keep_xQxW)
    # Leading axes may have broadcast (random synthesizer logits are shared by the batch):
    # each cotangent is summed back to its input's shape.
    return (_sum_to(dscores_xQxW, shape_xQx0.shape[:-1] + weights_xQxW.shape[-1:]), None,
            _sum_to(dv_xWxD, v_xWxD.shape), None)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` over the axes that broadcasting added or expanded, back to `shape`."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


_softmax_pv.defvjp(_softmax_pv_fwd, _softmax_pv_bwd)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                      key_mask_BxM: jax.Array, bias_HxLxM: jax.Array | None = None,
                      drop: ProbDropout | None = None) -> jax.Array:
    """Exact dense softmax attention in its fastest explicit XLA form (equal to
    `masked_softmax_attention` with a key mask, dropout masks included): heads-first layout, the
    1/sqrt(D) scale on q, normalisation after the product with V, and a hand-written VJP
    (`_dense_core`)."""
    scale = q_BxLxHxD.shape[-1] ** -0.5
    has_bias = bias_HxLxM is not None
    bias_HxLxM = bias_HxLxM if has_bias else jnp.zeros((), q_BxLxHxD.dtype)
    keys_2, rate = (_NO_KEYS, 0.0) if drop is None else (drop.keys_2, drop.rate)
    out_BxHxLxD = _dense_core(heads_first(q_BxLxHxD * scale), heads_first(k_BxMxHxD),
                              heads_first(v_BxMxHxD), key_mask_BxM, bias_HxLxM, keys_2,
                              has_bias, rate)
    return heads_first(out_BxHxLxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _dense_core(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2, has_bias,
                rate):
    return _dense_core_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2,
                           has_bias, rate)[0]


def _dense_core_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2, has_bias,
                    rate):
    scores_BxHxLxM = jnp.einsum("bhld,bhmd->bhlm", q_BxHxLxD, k_BxHxMxD)
    if has_bias:
        scores_BxHxLxM = scores_BxHxLxM + bias_HxLxM[None]
    weights_BxHxLxM, sums_BxHxLx1 = softmax_rows(scores_BxHxLxM, key_mask_BxM[:, None, None, :])
    keep_BxHxLxM = _keep(keys_2, rate, weights_BxHxLxM.shape, weights_BxHxLxM.dtype)
    dropped_BxHxLxM = weights_BxHxLxM if keep_BxHxLxM is None else weights_BxHxLxM * keep_BxHxLxM
    out_BxHxLxD = jnp.einsum("bhlm,bhmd->bhld", dropped_BxHxLxM, v_BxHxMxD) / sums_BxHxLx1
    return out_BxHxLxD, (q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, weights_BxHxLxM, sums_BxHxLx1,
                         out_BxHxLxD, bias_HxLxM, keys_2)


def _dense_core_bwd(has_bias, rate, residuals, dout_BxHxLxD):
    """FlashAttention's backward on the saved weights (`_softmax_pv_grads`; dropout masks are
    regenerated from their keys, not stored), then dQ = dS K and dK = dS^T Q, the latter again
    as [D, L] x [L, M] (the faster CPU orientation)."""
    (q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, weights_BxHxLxM, sums_BxHxLx1, out_BxHxLxD, bias,
     keys_2) = residuals
    keep_BxHxLxM = _keep(keys_2, rate, weights_BxHxLxM.shape, weights_BxHxLxM.dtype)
    dscores_BxHxLxM, dv_BxHxMxD = _softmax_pv_grads(weights_BxHxLxM, sums_BxHxLx1, v_BxHxMxD,
                                                    out_BxHxLxD, dout_BxHxLxD, keep_BxHxLxM)
    dq_BxHxLxD = jnp.einsum("bhlm,bhmd->bhld", dscores_BxHxLxM, k_BxHxMxD)
    dk_BxHxDxM = jnp.einsum("bhld,bhlm->bhdm", q_BxHxLxD, dscores_BxHxLxM)
    # The mask has no cotangent; the score bias (ALiBi) is a constant of the model: zero.
    return (dq_BxHxLxD, jnp.swapaxes(dk_BxHxDxM, -1, -2), dv_BxHxMxD, None, jnp.zeros_like(bias),
            None)


_dense_core.defvjp(_dense_core_fwd, _dense_core_bwd)


def pad_to_multiple(x_BxLx: jax.Array, mask_BxL: jax.Array, multiple: int
                    ) -> tuple[jax.Array, jax.Array, int]:
    """Pad the length axis (axis 1) to a multiple of `multiple`; padding is masked out."""
    length = x_BxLx.shape[1]
    pad = (-length) % multiple
    if pad == 0:
        return x_BxLx, mask_BxL, length
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_BxLx.ndim - 2)
    return jnp.pad(x_BxLx, widths), jnp.pad(mask_BxL, [(0, 0), (0, pad)]), length


def numpy_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)



# kind -> Attention subclass, filled by @register (the built-in variants when models.attention is
# imported; a plugin's when its module is imported, see lra.plugins).
REGISTRY: dict[str, type[Attention]] = {}


def register(cls: type[Attention]) -> type[Attention]:
    """Class decorator: make an Attention subclass available as `model.attention.kind=<kind>`
    and as `model=<kind>` (the kind is its config dataclass's `kind` default):

        @dataclasses.dataclass
        class MyConfig(AttentionConfig):
            kind: str = "my_attention"
            ...

        @register
        class MyAttention(Attention):
            config_cls = MyConfig
            ...
    """
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
