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
from lra.models.attention.softmax import masked_softmax_attention, softmax_attention

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


def cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, key_mask_BxL, bias_HxLxL=None):
    """cuDNN flash attention through JAX; raises (at trace time) where cuDNN cannot run it."""
    bias = None if bias_HxLxL is None else bias_HxLxL[None].astype(q_BxLxHxD.dtype)
    return jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, bias=bias,
                                        mask=key_mask_BxL[:, None, None, :],
                                        implementation="cudnn")


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
        impl = self.cfg.impl
        drop = self.drop(rng)
        if impl == "reference":
            bias_1xHxLxL = None if bias_HxLxL is None else bias_HxLxL[None]
            return masked_softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                            mask_BxL[:, None, None, :], bias_1xHxLxL, drop)
        if drop is not None and impl == "auto":
            # cuDNN's dropout draws its own masks (JAX's API has no dropout argument):
            # probability dropout runs in the explicit form, the same numbers as `reference`.
            _log_once("dense attention: explicit XLA form (attention-probability dropout)")
            return softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL, drop)
        if impl == "cudnn":
            return cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL)
        if impl == "auto":
            backend = jax.default_backend()
            if backend == "gpu":
                try:
                    out = cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL)
                    _log_once("dense attention: cuDNN flash attention (impl=auto on gpu)")
                    return out
                except Exception as err:  # noqa: BLE001 - any refusal falls back, logged once
                    reason = " ".join(str(err).split())[:200]
                    _log_once(f"dense attention: cuDNN not taken ({type(err).__name__}: "
                              f"{reason}); using the explicit XLA form")
            else:
                _log_once(f"dense attention: explicit XLA form (impl=auto; cuDNN needs a GPU, "
                          f"backend is {backend})")
        return softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias_HxLxL, drop)

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        b, length, h, _ = q_BxLxHxD.shape
        return jnp.broadcast_to(mask_BxL[:, None, None, :], (b, h, length, length))
