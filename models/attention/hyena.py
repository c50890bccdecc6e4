"""Hyena, order 2 (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language
Models").

    (v, x1, x2) = ShortConv(Linear_{E -> 3E}(u))        causal depthwise conv, 3 taps
    z = v;  z = x1 * (h1 * z);  z = x2 * (h2 * z);  y = Linear_{E -> E}(z)
with * a long convolution over the sequence plus a per-channel skip, (h * z)_t =
sum_m h[m] z_{t-m} + d z_t. The long filters are implicit (the paper's Hyena filters):
    h[m] = exp(-alpha_e |m| / (L_max - 1)) * FFN(PosEnc(m)),
PosEnc(m) = (m / (L_max - 1), cos(2 pi f m / L_max), -sin(2 pi f m / L_max)) for
(emb_dim - 1) / 2 frequencies f = linspace(1e-4, bands - 1, bands); FFN = three Linear + sin(w x)
layers of width K and a bias-free Linear to the filter channels; alpha_e spread linearly over
the E channels (ExponentialModulation). Bidirectional: the FFN also emits a backward filter
h_b (same window in |m|), so one two-sided filter, lags -(L-1)..L-1, sits in one circular kernel
of length 2L and one FFT of length 2L serves both directions (no circular wrap).

Cost: O(B E L log L) for the FFTs, O(L K (K + E)) for the filters, O(B L E^2) for the
projections; no L x L array. Padding: projected inputs are zeroed at padded positions before the
short convolution and again after it, so nothing at a padded position reaches a real one; a
convolution depends on lags only, so padding at the end does not shift the backward direction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import AttentionConfig, Buffer, SSMParam, TokenMixer, register
from lra.models.attention.mamba import causal_depthwise_conv

# Taps of the short causal depthwise convolution on the projections (short_filter_order=3 in
# the paper's reference code), and hidden Linear+sin layers after the FFN's input layer
# (num_inner_mlps=2 there).
SHORT_TAPS = 3
INNER_LAYERS = 2
ORDER = 2


@dataclasses.dataclass
class HyenaConfig(AttentionConfig):
    kind: str = "hyena"
    # K: width of the implicit filter's FFN (the reference HyenaOperator's filter_order=64).
    filter_dim: int = 64
    # Positional features fed to the FFN: t and (emb_dim - 1) / 2 cosine/sine pairs; odd >= 3.
    # 5 as the paper's associative-recall configs (the reference filter's default 3 has one band
    # at frequency 1e-4, i.e. nearly constant features besides t).
    emb_dim: int = 5
    # Initial frequency of the sine activations (hyena-filter.yaml's w=1), trained.
    sine_freq: float = 1.0
    # Window exp(-alpha t), t in [0, 1] over L_max: alpha from -ln(decay_target) / slow_decay to
    # -ln(decay_target) / fast_decay across channels (ExponentialModulation's 1.5, 0.3, 1e-2).
    fast_decay: float = 0.3
    slow_decay: float = 1.5
    decay_target: float = 1e-2
    # A two-sided filter (forward + backward lags), as s4d / lru here for classification;
    # False = causal, as the paper's language models.
    bidirectional: bool = True


def torch_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's Linear/Conv1d init the reference uses."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def positional_features(length: int, max_len: int, emb_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(t [L], PosEnc [L, emb_dim]) for lags 0..length-1, normalised by the built max_len."""
    lag_L = np.arange(length, dtype=np.float64)
    t_L = lag_L / max(max_len - 1, 1)
    bands = (emb_dim - 1) // 2
    angle_LxF = 2.0 * math.pi * lag_L[:, None] / max_len * np.linspace(1e-4, bands - 1, bands)
    features_Lx = np.concatenate([t_L[:, None], np.cos(angle_LxF), -np.sin(angle_LxF)], axis=1)
    return t_L.astype(np.float32), features_Lx.astype(np.float32)


def decay_rates(cfg: HyenaConfig, width: int) -> np.ndarray:
    """alpha [E]: the window's decay per channel, slow to fast."""
    log_target = math.log(cfg.decay_target)
    return np.abs(np.linspace(log_target / cfg.slow_decay, log_target / cfg.fast_decay, width))


def long_conv(z_BxLxE: jax.Array, h_CxLxE: jax.Array, d_E: jax.Array) -> jax.Array:
    """y_t = sum_m h_fwd[m] z_{t-m} (+ sum_m h_bwd[m] z_{t+m}) + d z_t, m in [0, L), in one
    FFT of length 2L: the two-sided filter has lag m at index m and lag -m at index 2L - m."""
    length, width = h_CxLxE.shape[1:]
    forward_LxE, gap_1xE = h_CxLxE[0], jnp.zeros((1, width), h_CxLxE.dtype)
    if h_CxLxE.shape[0] == 2:
        forward_LxE = forward_LxE.at[0].add(h_CxLxE[1, 0])
        backward_IxE = h_CxLxE[1, :0:-1]        # lags -(L-1) .. -1
    else:
        backward_IxE = jnp.zeros((length - 1, width), h_CxLxE.dtype)
    kernel_2LxE = jnp.concatenate([forward_LxE, gap_1xE, backward_IxE], axis=0)
    spectrum_BxFxE = (jnp.fft.rfft(z_BxLxE, n=2 * length, axis=1)
                      * jnp.fft.rfft(kernel_2LxE, n=2 * length, axis=0)[None])
    y_BxLxE = jnp.fft.irfft(spectrum_BxFxE, n=2 * length, axis=1)[:, :length]
    return y_BxLxE.astype(z_BxLxE.dtype) + d_E * z_BxLxE


def short_conv(u_BxLxE: jax.Array, kernel_3xE: jax.Array, bias_E: jax.Array) -> jax.Array:
    """Causal depthwise conv: y_t = sum_j kernel[j] u_{t-j} + bias (tap j = lag j): mamba.py's
    causal_depthwise_conv (its hand-written backward), whose taps run oldest first."""
    return causal_depthwise_conv(u_BxLxE[None], kernel_3xE[::-1][None], bias_E[None])[0]


@register
class HyenaMixer(TokenMixer):
    """u -> Linear(x2 * (h2 * (x1 * (h1 * v)))), (v, x1, x2) short-convolved projections of u."""

    config_cls = HyenaConfig

    @classmethod
    def check_seq_len(cls, cfg: HyenaConfig, seq_len: int) -> None:
        if (cfg.filter_dim < 1 or cfg.emb_dim < 3 or cfg.emb_dim % 2 == 0
                or not 0 < cfg.fast_decay <= cfg.slow_decay or not 0 < cfg.decay_target < 1):
            raise ValueError(f"hyena needs model.attention.filter_dim >= 1, an odd emb_dim >= 3, "
                             f"0 < fast_decay <= slow_decay and 0 < decay_target < 1 (got "
                             f"{cfg.filter_dim}, {cfg.emb_dim}, {cfg.fast_decay}, "
                             f"{cfg.slow_decay}, {cfg.decay_target}); fix them for "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, k = self.width, cfg.filter_dim
        directions = 2 if cfg.bidirectional else 1
        self.in_proj = nnx.Linear(e, (ORDER + 1) * e, rngs=rngs)
        conv_init = torch_uniform(SHORT_TAPS)  # depthwise: fan_in = taps
        self.short_kernel_3x3E = nnx.Param(conv_init(rngs.params(), (SHORT_TAPS, (ORDER + 1) * e)))
        self.short_bias_3E = nnx.Param(conv_init(rngs.params(), ((ORDER + 1) * e,)))
        # The implicit filter's FFN: its own optimizer group, as the reference trains it
        # (lr 1e-3 = train.ssm_lr, weight decay 0).
        first, hidden, last = torch_uniform(cfg.emb_dim), torch_uniform(k), torch_uniform(k)
        self.ffn_in_xK = SSMParam(first(rngs.params(), (cfg.emb_dim, k)))
        self.ffn_in_bias_K = SSMParam(first(rngs.params(), (k,)))
        self.ffn_hidden_2xKxK = SSMParam(hidden(rngs.params(), (INNER_LAYERS, k, k)))
        self.ffn_hidden_bias_2xK = SSMParam(hidden(rngs.params(), (INNER_LAYERS, k)))
        self.ffn_out_KxCx2xE = SSMParam(last(rngs.params(), (k, directions, ORDER, e)))
        # One trained frequency per unit, shared by every sine layer (as the reference's `act`).
        self.sine_freq_K = SSMParam(jnp.full((k,), cfg.sine_freq, jnp.float32))
        self.alpha_E = Buffer(jnp.asarray(decay_rates(cfg, e), jnp.float32))
        # Per-filter skip d (the reference filter's bias ~ N(0, 1)).
        self.d_2xE = nnx.Param(jax.random.normal(rngs.params(), (ORDER, e)))
        self.out = nnx.Linear(e, e, rngs=rngs)

    def filters(self, length: int) -> jax.Array:
        """h [C, 2, L, E]: per direction and order, the windowed implicit filter at lags 0..L-1."""
        t_L, features_Lx = positional_features(length, self.max_len, self.cfg.emb_dim)
        freq_K = self.sine_freq_K[...]
        hidden_LxK = jnp.sin(freq_K * (features_Lx @ self.ffn_in_xK[...] + self.ffn_in_bias_K[...]))
        for i in range(INNER_LAYERS):
            hidden_LxK = jnp.sin(freq_K * (hidden_LxK @ self.ffn_hidden_2xKxK[i]
                                           + self.ffn_hidden_bias_2xK[i]))
        h_LxCx2xE = jnp.einsum("lk,kcoe->lcoe", hidden_LxK, self.ffn_out_KxCx2xE[...])
        window_LxE = jnp.exp(-t_L[:, None] * self.alpha_E[...])
        return (h_LxCx2xE * window_LxE[:, None, None]).transpose(1, 2, 0, 3)

    def mix(self, x_BxLxE, mask_BxL):
        keep_BxLx1 = mask_BxL[:, :, None]
        u_BxLx3E = jnp.where(keep_BxLx1, self.in_proj(x_BxLxE), 0.0)
        u_BxLx3E = short_conv(u_BxLx3E, self.short_kernel_3x3E[...], self.short_bias_3E[...])
        # Zero again: the conv's bias (and later gates) must give padded positions nothing.
        v_BxLxE, *gates = jnp.split(jnp.where(keep_BxLx1, u_BxLx3E, 0.0), ORDER + 1, axis=-1)
        h_Cx2xLxE = self.filters(x_BxLxE.shape[1])
        z_BxLxE = v_BxLxE
        for i, gate_BxLxE in enumerate(gates):
            z_BxLxE = gate_BxLxE * long_conv(z_BxLxE, h_Cx2xLxE[:, i], self.d_2xE[i])
        return self.out(z_BxLxE)
