"""FNet (Lee-Thorp et al. 2021): parameter-free Fourier token mixing, the no-attention baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lra.models.attention.base import Attention, AttentionConfig, register


@dataclasses.dataclass
class FNetConfig(AttentionConfig):
    kind: str = "fnet"


@register
class FourierMixer(Attention):
    """Re(FFT_seq(FFT_hidden(x))): O(L log L), no parameters, no projections around it."""

    config_cls = FNetConfig
    mixer = True

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        b, length, h, d = v_BxLxHxD.shape
        # Zeroing padding first makes real outputs independent of padded content.
        x_BxLxE = jnp.where(mask_BxL[:, :, None], v_BxLxHxD.reshape(b, length, h * d), 0.0)
        mixed_BxLxE = jnp.fft.fft2(x_BxLxE, axes=(1, 2)).real.astype(v_BxLxHxD.dtype)
        return mixed_BxLxE.reshape(b, length, h, d)
