"""FNet (Lee-Thorp et al. 2021): parameter-free Fourier token mixing, the no-attention baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lra.models.attention.base import AttentionConfig, TokenMixer, register


@dataclasses.dataclass
class FNetConfig(AttentionConfig):
    kind: str = "fnet"


@register
class FourierMixer(TokenMixer):
    """Re(FFT_seq(FFT_hidden(x))): O(L log L), no parameters, no projections around it."""

    config_cls = FNetConfig

    def mix(self, x_BxLxE, mask_BxL):
        # Zeroing padding first makes real outputs independent of padded content.
        x_BxLxE = jnp.where(mask_BxL[:, :, None], x_BxLxE, 0.0)
        return jnp.fft.fft2(x_BxLxE, axes=(1, 2)).real.astype(x_BxLxE.dtype)
