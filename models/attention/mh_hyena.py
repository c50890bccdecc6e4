"""Multi-head Hyena (Poli, Thomas, Nguyen et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures", arXiv 2403.17844): the `mh-hyena` mixer of MAD's model zoo, Hyena with a D x D
state expansion per head, i.e. a linear attention whose running sum is a long implicit filter.

Source: the MAD code (athms/mad-lab) `MultiHeadHyenaOperator` in mad/model/layers/hyena.py, its
`fftconv_heads` (mad/model/layers/ops/fftconv.py) and configs/layers/mh-hyena.yml; filter from
mad/model/layers/featurization/hyena_filter.py. With E = H D, per head h (channels hD .. hD+D-1):
    (q, v, k) = ShortConv(Tile_G(Linear_{E -> 3E/G}(u)))       MAD's (x1, x2, v), 3-tap causal
    S_t = sum_{s <= t} f_h[t - s] k_s v_s^T  (+ sum_{s >= t} b_h[s - t] k_s v_s^T)  + d_h k_t v_t^T
    y_t = q_t^T S_t  (a row of D),   out = Linear_{E -> E}(y)
Tile_G repeats the 3E/G projected channels G times (MAD's tied "proj_groups"), so the q, v and k
channels share projections, each then with its own short-conv taps and bias. With f = 1 and d = 0
this is causal linear attention (S_t the cumulative sum of k_s v_s^T). The filters are
hyena.py's implicit Hyena filters, one per head: f_h[m] = exp(-alpha_h m / (L_max - 1))
FFN(PosEnc(m))_h (PosEnc, sine FFN of width K and ExponentialModulation with alpha spread over
the H heads, as MAD's HyenaFilter with d_model = H), and d_h the long conv's bias (MAD:
N(0, 1)). `fftconv_heads` forms kv[i, j, h] = k[h, i] v[h, j], convolves each of those H D^2
channels with its head's filter by FFT (length 2L: no wrap), adds d kv and contracts with q.

Form: that FFT form only (a convolution with an L-long filter has no finite recurrence); the
float64 reference in the tests sums the convolutions directly. Cost: O(B H D^2 L log L) time for
the FFTs of the outer products (plus O(H D^2 L log L) for the filter's, repeated per channel so
that hyena.py's `long_conv` serves unchanged), O(B L E^2) for the projections and O(L K (K + H))
for the filters; memory O(B L H D^2) = O(B L E D): the outer products and their spectrum. No
L x L array.

Bidirectional (default; MAD's layer is causal): the FFN also emits a backward filter b_h, one
two-sided filter as in hyena.py (lag 0 counts f_h[0] + b_h[0]), one FFT of length 2L for both.
False = causal, MAD's layer. Padding: projected inputs are zeroed at padded positions before the
short conv and again after it (its bias), so q, k, v and every k v^T are 0 there; a convolution
depends on lags only, so padding at the end does not shift the backward direction.

Defaults are MAD's mh-hyena.yml and the code defaults it keeps: filter width K = 2 (its
filter_cfg order 2), emb_dim 3 and sine frequency 1 (HyenaFilter), decay 0.3 / 1.5 / 1e-2
(ExponentialModulation), G = 4 (HyenaOperator's proj_groups, which MultiHeadHyenaOperator
inherits: the yml sets none), inner_factor 1, 3 short-conv taps. Heads: MAD's code passes its
`num_heads` as `fftconv_heads`' head_dim, so mh-hyena.yml's num_heads 16 at dim 128 is 8 heads of
D = 16; here H and D are the encoder's (model.num_heads).

Departures: (1) bidirectional by default (above). (2) PosEnc is fixed (hyena.py's; MAD trains it
at lr 1e-5). (3) in/out projections use nnx.Linear's init (hyena.py's choice; MAD: PyTorch's).
(4) MAD's short conv stores its taps lag-reversed (Conv1d); the same function, reparametrised.

Shape letters beyond base.py's table, used only in this module: K is the filter FFN's width (as
in hyena.py) and Z the H D^2 channels of the outer products k_t v_t^T, head-major (h, i, j).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import Buffer, SSMParam, TokenMixer, register
from lra.models.attention.hyena import (INNER_LAYERS, SHORT_TAPS, HyenaConfig, HyenaMixer,
                                        decay_rates, long_conv, short_conv, torch_uniform)


@dataclasses.dataclass
class MHHyenaConfig(HyenaConfig):
    kind: str = "mh_hyena"
    # K: width of the implicit filter's FFN (mh-hyena.yml's long_conv_cfg.filter_cfg.order: 2).
    filter_dim: int = 2
    # Positional features t, cos, -sin: HyenaFilter's default emb_dim 3 (mh-hyena.yml keeps it).
    emb_dim: int = 3
    # sine_freq (1), fast_decay (0.3), slow_decay (1.5), decay_target (1e-2), bidirectional
    # (True): hyena.py's fields, whose defaults are MAD's HyenaFilter / ExponentialModulation.
    # G: the in-projection has 3E / G outputs, tiled G times to q | v | k (HyenaOperator's
    # proj_groups=4, inherited by MultiHeadHyenaOperator; 1 = three untied E -> E projections).
    proj_groups: int = 4


@register
class MHHyenaMixer(TokenMixer):
    """u -> Linear(q_t^T (f * k v^T)_t) per head, (q, v, k) short-convolved projections of u."""

    config_cls = MHHyenaConfig
    # hyena.py's implicit filter (PosEnc -> sine FFN -> exponential window), reused as it is: it
    # reads the FFN's parameters by their names there (the two adapters below).
    filters = HyenaMixer.filters

    @classmethod
    def check_seq_len(cls, cfg: MHHyenaConfig, seq_len: int) -> None:
        if (cfg.filter_dim < 1 or cfg.emb_dim < 3 or cfg.emb_dim % 2 == 0 or cfg.proj_groups < 1
                or not 0 < cfg.fast_decay <= cfg.slow_decay or not 0 < cfg.decay_target < 1):
            raise ValueError(f"mh_hyena needs model.attention.filter_dim >= 1, an odd emb_dim "
                             f">= 3, proj_groups >= 1, 0 < fast_decay <= slow_decay and "
                             f"0 < decay_target < 1 (got {cfg.filter_dim}, {cfg.emb_dim}, "
                             f"{cfg.proj_groups}, {cfg.fast_decay}, {cfg.slow_decay}, "
                             f"{cfg.decay_target}); fix them for task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, h, k, groups = self.width, self.num_heads, cfg.filter_dim, cfg.proj_groups
        if (3 * e) % groups:
            raise ValueError(f"mh_hyena: model.attention.proj_groups={groups} must divide 3 x the "
                             f"width {e}; use proj_groups=1 or 3")
        directions = 2 if cfg.bidirectional else 1
        self.in_proj = nnx.Linear(e, 3 * e // groups, rngs=rngs)
        conv_init = torch_uniform(SHORT_TAPS)  # depthwise Conv1d: fan_in = taps
        self.short_kernel_3x3E = nnx.Param(conv_init(rngs.params(), (SHORT_TAPS, 3 * e)))
        self.short_bias_3E = nnx.Param(conv_init(rngs.params(), (3 * e,)))
        # The implicit filter's FFN, in the filter's optimizer group (MAD: lr 1e-3, no decay),
        # under hyena.py's names; its output layer emits one filter per head and direction.
        first, hidden, last = torch_uniform(cfg.emb_dim), torch_uniform(k), torch_uniform(k)
        self.ffn_in_xK = SSMParam(first(rngs.params(), (cfg.emb_dim, k)))
        self.ffn_in_bias_K = SSMParam(first(rngs.params(), (k,)))
        self.ffn_hidden_2xKxK = SSMParam(hidden(rngs.params(), (INNER_LAYERS, k, k)))
        self.ffn_hidden_bias_2xK = SSMParam(hidden(rngs.params(), (INNER_LAYERS, k)))
        self.ffn_out_KxCxH = SSMParam(last(rngs.params(), (k, directions, h)))
        self.sine_freq_K = SSMParam(jnp.full((k,), cfg.sine_freq, jnp.float32))
        self.alpha_H = Buffer(jnp.asarray(decay_rates(cfg, h), jnp.float32))
        # d_h: the long conv's bias, one per head (MAD's HyenaConv: torch.randn).
        self.d_H = nnx.Param(jax.random.normal(rngs.params(), (h,)))
        self.out = nnx.Linear(e, e, rngs=rngs)

    # hyena.py's `filters` reads an order axis (one long convolution here) and E channels (the
    # H heads here) under these names.
    @property
    def ffn_out_KxCx2xE(self) -> jax.Array:
        return self.ffn_out_KxCxH[...][:, :, None]

    @property
    def alpha_E(self) -> jax.Array:
        return self.alpha_H[...]

    def projections(self, x_BxLxE: jax.Array, mask_BxL: jax.Array):
        """q, v, k [B, L, H, D]: tiled in-projection, short conv, zero at padded positions."""
        b, length, e = x_BxLxE.shape
        keep_BxLx1 = mask_BxL[:, :, None]
        u_BxLx3E = jnp.tile(self.in_proj(x_BxLxE), (1, 1, self.cfg.proj_groups))
        u_BxLx3E = short_conv(jnp.where(keep_BxLx1, u_BxLx3E, 0.0), self.short_kernel_3x3E[...],
                              self.short_bias_3E[...])
        # Zero again: the conv's bias must give padded positions nothing.
        u_BxLx3E = jnp.where(keep_BxLx1, u_BxLx3E, 0.0)
        split = (b, length, self.num_heads, self.head_dim)
        return tuple(x.reshape(split) for x in jnp.split(u_BxLx3E, 3, axis=-1))

    def mix(self, x_BxLxE, mask_BxL):
        b, length, e = x_BxLxE.shape
        h, d = self.num_heads, self.head_dim
        q_BxLxHxD, v_BxLxHxD, k_BxLxHxD = self.projections(x_BxLxE, mask_BxL)
        kv_BxLxZ = jnp.einsum("blhi,blhj->blhij", k_BxLxHxD, v_BxLxHxD).reshape(b, length, -1)
        # Each head's filter and skip on its D^2 channels of k v^T.
        h_CxLxZ = jnp.repeat(self.filters(length)[:, 0], d * d, axis=-1)
        d_Z = jnp.repeat(self.d_H[...], d * d)
        s_BxLxHxDxD = long_conv(kv_BxLxZ, h_CxLxZ, d_Z).reshape(b, length, h, d, d)
        y_BxLxHxD = jnp.einsum("blhi,blhij->blhj", q_BxLxHxD, s_BxLxHxDxD)
        return self.out(y_BxLxHxD.reshape(b, length, e))
