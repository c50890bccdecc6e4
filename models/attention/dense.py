"""Dense softmax attention: the exact O(L^2) baseline, in the fastest form each backend offers.

`impl` (model.attention.impl):
- auto (default): cuDNN's fused flash attention on a GPU when it accepts the call, otherwise the
  explicit XLA form; which one ran is logged once per process with the reason.
- explicit: `softmax_attention` (heads-first layout, stop-gradient max, normalise after PV):
  the fastest exact form measured on CPU (docs/efficiency.md "Efficiency baselines").
- cudnn: `jax.nn.dot_product_attention(implementation="cudnn")`; an error where unavailable.
- reference: the textbook einsum + `jax.nn.softmax` (what tests compare against; kept to
  measure what the explicit form gains).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from lra.models.attention.base import AttentionConfig, ExactSoftmax, check_choice, register
from lra.models.attention.softmax import NEG_INF, masked_softmax_attention, softmax_attention

IMPLS = ("auto", "explicit", "cudnn", "reference")
log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


@dataclasses.dataclass
class DenseConfig(AttentionConfig):
    kind: str = "dense"
    impl: str = "auto"  # auto | explicit | cudnn | reference (see the module docstring)
    # Query i sees keys j <= i only (a causal language model's attention; train.pretrain's
    # causal objective); the scores stay L x L.
    causal: bool = False


def cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, key_mask_BxL, bias_HxLxL=None,
                    causal: bool = False):
    """cuDNN flash attention through JAX; raises (at trace time) where cuDNN cannot run it."""
    bias = None if bias_HxLxL is None else bias_HxLxL[None].astype(q_BxLxHxD.dtype)
    return jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, bias=bias,
                                        mask=key_mask_BxL[:, None, None, :], is_causal=causal,
                                        implementation="cudnn")


def every_real_key(q_BxLxHxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """bool[B, H, L, L]: dense attention's pattern, every query over every real key."""
    b, length, h, _ = q_BxLxHxD.shape
    return jnp.broadcast_to(mask_BxL[:, None, None, :], (b, h, length, length))


def causal_bias(length: int, dtype) -> jax.Array:
    """[1, L, L]: 0 where key j <= query i, NEG_INF above the diagonal (added to the scores,
    exp gives exactly 0 there; a head axis of 1 broadcasts)."""
    pos_L = jnp.arange(length)
    return jnp.where(pos_L[None, :] <= pos_L[:, None], 0.0, NEG_INF).astype(dtype)[None]


@register
class DenseAttention(ExactSoftmax):
    config_cls = DenseConfig
    quadratic = True

    @classmethod
    def check_seq_len(cls, cfg: DenseConfig, seq_len: int) -> None:
        check_choice(cfg, "impl", IMPLS)
        if cfg.impl == "cudnn" and cfg.dropout > 0:
            raise ValueError("model.attention.impl=cudnn has no attention-probability dropout in "
                             "JAX; use impl=auto or explicit, or model.attention.dropout=0")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        bias_HxLxL = None
        if bias is not None:  # the scores are L x L anyway: so is the bias
            pos_L = jnp.arange(q_BxLxHxD.shape[1])
            bias_HxLxL = bias(pos_L[:, None] - pos_L[None, :], q_BxLxHxD.dtype)
        impl, causal = self.cfg.impl, self.cfg.causal
        drop = self.drop(rng)
        if impl == "reference":
            bias_1xHxLxL = None if bias_HxLxL is None else bias_HxLxL[None]
            return masked_softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                            self.reference_mask(q_BxLxHxD, k_BxLxHxD, mask_BxL),
                                            bias_1xHxLxL, drop)
        # The explicit form takes causality as one more additive term on the L x L scores;
        # cuDNN as its flag.
        explicit_bias = bias_HxLxL
        if causal:
            tri_1xLxL = causal_bias(q_BxLxHxD.shape[1], q_BxLxHxD.dtype)
            explicit_bias = tri_1xLxL if bias_HxLxL is None else bias_HxLxL + tri_1xLxL
        if drop is not None and impl == "auto":
            # cuDNN's dropout draws its own masks (JAX's API has no dropout argument):
            # probability dropout runs in the explicit form, the same numbers as `reference`.
            _log_once("dense attention: explicit XLA form (attention-probability dropout)")
            return softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, explicit_bias,
                                     drop)
        if impl == "cudnn":
            return cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL, causal)
        if impl == "auto":
            backend = jax.default_backend()
            if backend == "gpu":
                try:
                    out = cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL,
                                          causal)
                    _log_once("dense attention: cuDNN flash attention (impl=auto on gpu)")
                    return out
                except Exception as err:  # noqa: BLE001 - any refusal falls back, logged once
                    reason = " ".join(str(err).split())[:200]
                    _log_once(f"dense attention: cuDNN not taken ({type(err).__name__}: "
                              f"{reason}); using the explicit XLA form")
            else:
                _log_once(f"dense attention: explicit XLA form (impl=auto; cuDNN needs a GPU, "
                          f"backend is {backend})")
        return softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, explicit_bias, drop)

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        allowed_BxHxLxL = every_real_key(q_BxLxHxD, mask_BxL)
        if self.cfg.causal:
            pos_L = jnp.arange(q_BxLxHxD.shape[1])
            allowed_BxHxLxL = allowed_BxHxLxL & (pos_L[None, :] <= pos_L[:, None])
        return allowed_BxHxLxL
