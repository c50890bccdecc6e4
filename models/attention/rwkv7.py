"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State Evolution",
arXiv 2503.14456): its time-mixing block, the generalised delta rule with a vector-valued decay,
as a token mixer.

The paper's recurrence, per head (its S_t [D, D] has value rows and key columns, o_t = S_t r_t):
    S_t = S_{t-1} (diag(w_t) - kh_t^T (a_t * kh_t)) + v_t^T kt_t
Here the state is its transpose (rows = key channels, o_t = r_t S_t, as deltanet.py's), so
    S_t = (diag(w_t) + beta_t^T alpha_t) S_{t-1} + kt_t^T v_t,   o_t = r_t S_t,
    alpha_t = -kh_t (it reads the state),  beta_t = a_t * kh_t (where the erasure is written),
a diagonal-plus-rank-one transition (fla's "DPLR" with its a = -kh, b = kh * a). The block:
    x^c_t = x_t + (x_{t-1} - x_t) mu_c    c in {r, w, k, v, a, g}   (token shift; x_{-1} = 0)
    r = x^r W_r,  k = x^k W_k,  v = x^v W_v                         (E -> E, no biases)
    d = w0 + tanh(x^w W1) W2,   w_t = exp(-e^-0.5 sigmoid(d_t))     (per channel, in
                                                                      (e^-e^-0.5, 1) = (0.545, 1))
    a = sigmoid(a0 + x^a A1 A2)                                     (in-context learning rate)
    g = sigmoid(x^g G1) G2                                          (output gate, no bias)
    kh = L2Norm_h(k * xi),   kt = k * (1 + (a - 1) alpha_mix)       (removal, replacement keys)
    out = (g * (GroupNorm_h(o) + (sum_h r * rho * kt) v)) W_o       (bonus term, per head)
with rho one vector per head and the GroupNorm's eps D * 1e-5 (the paper's code's 64e-5 at its
head size 64; fla's head_dim * norm_eps at any size).

Initialisation, as the paper's code (BlinkDL/RWKV-LM RWKV-v7/train_temp/src/model.py, its
RWKV_Tmix_x070 at the paper's release): with layer l of n, channel i of E and
linear_i = i / (E - 1) - 0.5, zigzag_i = z|z| where z = (i mod D - (D-1)/2) / ((D-1)/2),
    mu_r, mu_w, mu_k, mu_v, mu_a, mu_g = 1 - (i/E)^(p (1 - l/n)), p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2
    w0 = -6 + 6 (i/(E-1))^(1 + (l/(n-1))^0.3) + 0.5 + 2.5 zigzag      (0 for l/(n-1) if n = 1)
    a0 = -0.19 + 0.3 zigzag + 0.4 linear,  xi = 0.71 - 0.1 linear,  alpha_mix = 1.02,  rho = -0.04
    W1, A1, G1 = 0;  W2, A2, G2 orthogonal x 0.1;  W_r, W_v ~ U(+-0.5/sqrt(E)),
    W_k ~ U(+-0.05/sqrt(E)),  W_o = 0,  GroupNorm weight 1, bias 0.
A module sees no layer index: the encoder hands every layer's module to `tie_layers` (first
first), which sets the depth-dependent mu and w0 (a lone module is layer 0 of 1).
LoRA ranks: the paper's suggestions, 1.8 sqrt(E) (w, a) and 0.6 E^0.8 (g), rounded to a
multiple of 8 with a floor of 8 (its code rounds to 32 with a floor of 32, GPU tile sizes: at
E = 32..128 that floor would make the "low-rank" MLPs as wide as E or half of it). E = 32: 8, 8,
8 (the paper's simplified demo's 8 at E = 32); E = 128: 24, 24, 32; E = 768: 48, 48, 120 (the
paper's 64, 64, 128).

Chunkwise form (what trains; fla's chunked DPLR kernels' algorithm with the UT transform of
deltanet.py): chunks of S positions, b_i the cumulative log decay from the chunk's start to i
inclusive (per channel, <= 0), b_0 = 0, S_0 the state entering the chunk. The erased rows
e_i = alpha_i S_{i-1} obey, unrolled inside the chunk,
    e_i = (alpha_i e^(b_(i-1))) S_0 + sum_{j<i} (alpha_i e^(b_(i-1)) . beta_j e^(-b_j)) e_j
                                     + sum_{j<i} (alpha_i e^(b_(i-1)) . kt_j e^(-b_j)) v_j,
so with A_ab, A_ak those strictly lower S x S matrices and T = (I - A_ab)^-1 (`unit_lower_inverse`)
    E = W S_0 + U,  W = T (alpha e^(b_prev)),  U = T A_ak V,
    O = (r e^b) S_0 + Q_b E + Q_k V      (Q_b, Q_k: r_i e^(b_i) . {beta_j, kt_j} e^(-b_j), j <= i)
    S_next = e^(b_S) S_0 + (beta e^(b_S - b))^T E + (kt e^(b_S - b))^T V.
Everything but the S_0 terms is independent across chunks and computed for all chunks at once; a
lax.scan over the chunks carries S (two S x D x D products a step) and emits each chunk's S_0 and
E, and O follows for all chunks at once. The factorisation relative to the chunk's start
needs e^(-b_j), which grows, and e^(b_i), which shrinks, in float32: the decay's floor
log w >= -e^-0.5 = -0.607 a step bounds both by e^(0.607 S): e^9.7 ~ 1.6e4 at the default S = 16,
e^77.6 at S = 128 (chunk_size's limit; float32 overflows at e^88.7 and flushes below e^-87.3).
Each factored product carries the relative error of its two factors (no cancellation between
large terms), so the form is exact to float32 rounding within that range (tested at 16 and 128
against a float64 step-by-step loop at the floor decay). Cost per head O(L S (S + D) + L D^2)
time, O(L S + L D^2 / S) memory; no L x L array. `recurrent` runs the recurrence one position at
a time (a lax.scan over L), the reference form.

Bidirectional (default; an encoder for classification): the recurrence runs over the sequence and
over its reversal with the same r, w, k, v, a (one token shift, x_{t-1}, one set of projections:
the second direction costs one more recurrence, nothing else); the two o are summed before the
GroupNorm (as deltanet.py's: token t's write also erases, so each direction reads its own state
after absorbing t and both are kept). The bonus term and the gate are computed once.
Padding: x is zeroed at padded positions (the token shift reads them as the zero before a start)
and there log w = 0, kh = 0, kt = 0 and v = 0: the state is held and nothing is written, so the
reversed pass starts from a zero state at the last real token. Real outputs never read padding.

Departures, each with its reason:
- No value residual (the paper's v_t = lerp(v_t, v^0_t, nu_t) with the first layer's v^0): a
  mixer sees only its own layer's input. Its LoRA (rank 1.3 sqrt(E)) and nu are left out with it.
- The block around the mixer is the shared encoder's (pre-LN, GeLU MLP), not RWKV's channel mix.
- Bidirectional by default (above); `bidirectional=false` is the paper's causal layer.
- w0 (the decay's bias) is an `SSMParam`: train.ssm_lr and no weight decay. The paper's code
  gives it its own group too (2x the learning rate, no weight decay); the harness's recurrence
  group is that group here.
- LoRA ranks rounded to 8 (above) and the GroupNorm eps D * 1e-5 for any head size D.
- `zero_init=false` (not the default) draws W_o and W1, A1, G1 small and random (LeCun normal,
  x 0.1 for the LoRA factors) instead of zero. lra.check's every-parameter-gets-a-gradient check
  uses it, because with W_o = 0 no other parameter has a gradient at step 0 (after one step W_o
  is non-zero and every parameter learns, as in the paper's training).

Shape letters beyond base.py's table, used only in this module: K is a LoRA rank, 6 the six
token-shift mixes (r, w, k, v, a, g).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (AttentionConfig, SSMParam, TokenMixer,
                                       blocks_head_major, register, unblock_head_major)
from lra.models.attention.deltanet import unit_lower_inverse

# log w_t = -e^-0.5 sigmoid(d_t) >= -DECAY_FLOOR: the per-step bound of the chunk factorisation.
DECAY_FLOOR = math.exp(-0.5)
# chunk_size's limit: e^(DECAY_FLOOR * S) stays inside float32's normal range (e^+-87.3).
MAX_CHUNK = 128
# F.normalize's eps (the paper's code), on the norm: x / max(|x|, eps).
L2_EPS = 1e-12
# GroupNorm eps per channel of a head (the paper's code: 64e-5 at head size 64).
NORM_EPS_PER_CHANNEL = 1e-5
# The token-shift mixes' exponents (r, w, k, v, a, g), the paper's code's.
MIX_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)


@dataclasses.dataclass
class RWKV7Config(AttentionConfig):
    kind: str = "rwkv7"
    # S: positions per chunk of the chunkwise form (16: the paper's CUDA kernel's CHUNK_LEN and
    # fla's DPLR chunk; at most 128, where e^(0.607 S) nears float32's range).
    chunk_size: int = 16
    # K: ranks of the decay (w), in-context learning rate (a) and gate (g) LoRA MLPs; 0 = from E
    # (the paper's 1.8 sqrt(E), 1.8 sqrt(E), 0.6 E^0.8, rounded to a multiple of 8, at least 8).
    decay_rank: int = 0
    iclr_rank: int = 0
    gate_rank: int = 0
    # The recurrence over the sequence + over its reversal, summed; False = causal (the paper's).
    bidirectional: bool = True
    # The paper's code's zeros (W_o and the LoRAs' first factors); False draws them small and
    # random (lra.check: with W_o = 0 nothing else has a gradient at step 0).
    zero_init: bool = True


def lora_rank(width: int, factor: float, power: float) -> int:
    """factor * width^power rounded to a multiple of 8, at least 8 (the paper's formulas with 8
    for its GPU tile size of 32)."""
    return max(8, 8 * round(factor * width ** power / 8))


def lora_ranks(cfg: RWKV7Config, width: int) -> tuple[int, int, int]:
    """(decay, iclr, gate) ranks: the config's, or the paper's formulas at width E."""
    return (cfg.decay_rank or lora_rank(width, 1.8, 0.5),
            cfg.iclr_rank or lora_rank(width, 1.8, 0.5),
            cfg.gate_rank or lora_rank(width, 0.6, 0.8))


def channel_profiles(width: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(linear, zigzag) [E]: the paper's code's per-channel init profiles."""
    i = np.arange(width, dtype=np.float64)
    linear = i / (width - 1) - 0.5 if width > 1 else np.zeros(width)
    half = (head_dim - 1) / 2
    z = ((i % head_dim) - half) / half if head_dim > 1 else np.zeros(width)
    return linear, z * np.abs(z)


def depth_inits(width: int, head_dim: int, layer: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu [6, E], w0 [E]) of layer `layer` of `layers`, as the paper's code."""
    ratio_0_to_1 = layer / (layers - 1) if layers > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer / layers
    ddd = np.arange(width, dtype=np.float64) / width
    mix_6xE = np.stack([1.0 - ddd ** (p * ratio_1_to_almost0) for p in MIX_POWERS])
    _, zigzag = channel_profiles(width, head_dim)
    span = np.arange(width) / max(width - 1, 1)
    www = -6.0 + 6.0 * span ** (1.0 + ratio_0_to_1 ** 0.3)
    return mix_6xE, www + 0.5 + 2.5 * zigzag


def lora_out_init(key: jax.Array, rank: int, width: int) -> jax.Array:
    """[K, E] orthogonal x 0.1 (x sqrt(K / E) when K > E), the paper's code's ortho_init."""
    gain = 0.1 * (math.sqrt(rank / width) if rank > width else 1.0)
    return nnx.initializers.orthogonal(scale=gain)(key, (rank, width))


def l2_normalize(x_xD: jax.Array) -> jax.Array:
    """x / max(|x|, 1e-12) along the last axis (F.normalize); finite gradient at x = 0."""
    return x_xD * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_xD ** 2, -1, keepdims=True), L2_EPS ** 2))


# ------------------------------------------------------------------------ the recurrence
# r, log_w, k, v, alpha, beta: [B, L, H, D] each; S_t = (diag(e^log_w_t) + beta_t^T alpha_t)
# S_{t-1} + k_t^T v_t, o_t = r_t S_t, from S = 0.


def wkv7_chunkwise(r_BxLxHxD: jax.Array, log_w_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                   v_BxLxHxD: jax.Array, alpha_BxLxHxD: jax.Array, beta_BxLxHxD: jax.Array,
                   chunk_size: int) -> jax.Array:
    """o [B, L, H, D] chunk by chunk (the module docstring's form). The sequence is padded to whole
    chunks with log_w = r = k = v = alpha = beta = 0, which hold the state."""
    length = r_BxLxHxD.shape[1]
    size = min(chunk_size, length)
    pad = [(0, 0), (0, (-length) % size), (0, 0), (0, 0)]
    r, g, k, v, alpha, beta = (blocks_head_major(jnp.pad(x, pad), size) for x in (
        r_BxLxHxD, log_w_BxLxHxD, k_BxLxHxD, v_BxLxHxD, alpha_BxLxHxD, beta_BxLxHxD))
    # [B, H, N, S, D] each. b_i (inclusive) and b_(i-1); every exponent within +-DECAY_FLOOR * S.
    b_xNxSxD = jnp.cumsum(g, axis=-2)
    b_last_xNx1xD = b_xNxSxD[..., -1:, :]
    grow_xNxSxD = jnp.exp(-b_xNxSxD)
    alpha_in_xNxSxD = alpha * jnp.exp(b_xNxSxD - g)
    r_in_xNxSxD = r * jnp.exp(b_xNxSxD)
    beta_up_xNxSxD, k_up_xNxSxD = beta * grow_xNxSxD, k * grow_xNxSxD
    strict_SxS = np.tril(np.ones((size, size), np.float32), -1)
    causal_SxS = np.tril(np.ones((size, size), np.float32))
    pairs = lambda x, y: jnp.einsum("bhnid,bhnjd->bhnij", x, y)
    a_ab_xNxSxS = pairs(alpha_in_xNxSxD, beta_up_xNxSxD) * strict_SxS
    a_ak_xNxSxS = pairs(alpha_in_xNxSxD, k_up_xNxSxD) * strict_SxS
    q_b_xNxSxS = pairs(r_in_xNxSxD, beta_up_xNxSxD) * causal_SxS
    q_k_xNxSxS = pairs(r_in_xNxSxD, k_up_xNxSxD) * causal_SxS
    # The UT transform: T = (I - A_ab)^-1, then W = T alpha e^(b_prev), U = T A_ak V.
    t_xNxSxS = unit_lower_inverse(-a_ab_xNxSxS)
    rows = lambda m, x: jnp.einsum("bhnij,bhnjd->bhnid", m, x)
    w_xNxSxD = rows(t_xNxSxS, alpha_in_xNxSxD)
    u_xNxSxD = rows(t_xNxSxS, rows(a_ak_xNxSxS, v))
    to_end_xNxSxD = jnp.exp(b_last_xNx1xD - b_xNxSxD)
    beta_out_xNxSxD = beta * to_end_xNxSxD
    kv_xNxDxD = jnp.einsum("bhnsd,bhnse->bhnde", k * to_end_xNxSxD, v)
    fade_xNxD = jnp.exp(b_last_xNx1xD[..., 0, :])

    def chunk(s_xDxD, inputs):
        w_xSxD, u_xSxD, beta_out_xSxD, kv_xDxD, fade_xD = inputs
        e_xSxD = jnp.einsum("bhsd,bhde->bhse", w_xSxD, s_xDxD) + u_xSxD
        s_next_xDxD = (fade_xD[..., :, None] * s_xDxD + kv_xDxD
                       + jnp.einsum("bhsd,bhse->bhde", beta_out_xSxD, e_xSxD))
        return s_next_xDxD, (s_xDxD, e_xSxD)

    b, h, _, _, d = r.shape
    leading = lambda x: jnp.moveaxis(x, 2, 0)  # the scan runs over N
    _, (entering_NxBxHxDxD, e_NxBxHxSxD) = jax.lax.scan(
        chunk, jnp.zeros((b, h, d, d), r.dtype),
        tuple(leading(x) for x in (w_xNxSxD, u_xNxSxD, beta_out_xNxSxD, kv_xNxDxD, fade_xNxD)))
    entering_xNxDxD, e_xNxSxD = (jnp.moveaxis(x, 0, 2) for x in (entering_NxBxHxDxD,
                                                                 e_NxBxHxSxD))
    out_xNxSxD = (jnp.einsum("bhnsd,bhnde->bhnse", r_in_xNxSxD, entering_xNxDxD)
                  + rows(q_b_xNxSxS, e_xNxSxD) + rows(q_k_xNxSxS, v))
    return unblock_head_major(out_xNxSxD)[:, :length]


def wkv7_recurrent(r_BxLxHxD: jax.Array, log_w_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                   v_BxLxHxD: jax.Array, alpha_BxLxHxD: jax.Array,
                   beta_BxLxHxD: jax.Array) -> jax.Array:
    """The same outputs one position at a time (a lax.scan over L): the reference form,
    O(L D^2) per head in L sequential steps."""
    b, _, h, d = r_BxLxHxD.shape

    def step(s_BxHxDxD, inputs):
        r_BxHxD, g_BxHxD, k_BxHxD, v_BxHxD, alpha_BxHxD, beta_BxHxD = inputs
        erased_BxHxD = jnp.einsum("bhd,bhde->bhe", alpha_BxHxD, s_BxHxDxD)
        s_BxHxDxD = (jnp.exp(g_BxHxD)[..., :, None] * s_BxHxDxD
                     + beta_BxHxD[..., :, None] * erased_BxHxD[..., None, :]
                     + k_BxHxD[..., :, None] * v_BxHxD[..., None, :])
        return s_BxHxDxD, jnp.einsum("bhd,bhde->bhe", r_BxHxD, s_BxHxDxD)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (r_BxLxHxD, log_w_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                               alpha_BxLxHxD, beta_BxLxHxD))
    _, out_LxBxHxD = jax.lax.scan(step, jnp.zeros((b, h, d, d), r_BxLxHxD.dtype), xs)
    return jnp.swapaxes(out_LxBxHxD, 0, 1)


# ------------------------------------------------------------------------ the block


@register
class RWKV7Mixer(TokenMixer):
    """x -> token shift -> r, w, k, v, a, g -> generalised delta rule (both directions) ->
    GroupNorm + bonus -> gate -> W_o."""

    config_cls = RWKV7Config
    # lra.check: small-but-real (L = 128 is 8 chunks; its padded row ends inside one), and
    # random instead of zero W_o and LoRA factors, so that every parameter has a gradient at init.
    # Memory growth: L^1.00 (the per-chunk S x S matrices and the carried states are O(L)).
    check_settings = {"chunk_size": 16, "zero_init": False}

    @classmethod
    def check_seq_len(cls, cfg: RWKV7Config, seq_len: int) -> None:
        if not 1 <= cfg.chunk_size <= MAX_CHUNK or min(cfg.decay_rank, cfg.iclr_rank,
                                                         cfg.gate_rank) < 0:
            raise ValueError(f"rwkv7 needs 1 <= model.attention.chunk_size <= {MAX_CHUNK} (its "
                             f"chunk factorisation's float32 range) and decay_rank, iclr_rank, "
                             f"gate_rank >= 0 (0 = from E) (got {cfg.chunk_size}, "
                             f"{cfg.decay_rank}, {cfg.iclr_rank}, {cfg.gate_rank}); 16 and 0 suit "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg, e, h, d = self.cfg, self.width, self.num_heads, self.head_dim
        rank_w, rank_a, rank_g = lora_ranks(cfg, e)
        linear, zigzag = channel_profiles(e, d)
        mix_6xE, w0_E = depth_inits(e, d, 0, 1)
        self.mix_6xE = nnx.Param(jnp.asarray(mix_6xE, jnp.float32))
        # r, k, v: U(+-0.5/sqrt(E)), U(+-0.05/sqrt(E)), U(+-0.5/sqrt(E)) (no biases).
        bound = 0.5 / math.sqrt(e)
        scale_3x1x1 = jnp.asarray([1.0, 0.1, 1.0])[:, None, None]
        self.rkv_3xExE = nnx.Param(scale_3x1x1 * jax.random.uniform(
            rngs.params(), (3, e, e), minval=-bound, maxval=bound))

        def first_factor(rank: int) -> nnx.Param:  # the LoRAs' E -> K factor: zero (paper)
            if cfg.zero_init:
                return nnx.Param(jnp.zeros((e, rank)))
            return nnx.Param(0.1 * nnx.initializers.lecun_normal()(rngs.params(), (e, rank)))

        self.w1_ExK, self.w2_KxE = first_factor(rank_w), nnx.Param(
            lora_out_init(rngs.params(), rank_w, e))
        self.w0_E = SSMParam(jnp.asarray(w0_E, jnp.float32))
        self.a1_ExK, self.a2_KxE = first_factor(rank_a), nnx.Param(
            lora_out_init(rngs.params(), rank_a, e))
        self.a0_E = nnx.Param(jnp.asarray(-0.19 + 0.3 * zigzag + 0.4 * linear, jnp.float32))
        self.g1_ExK, self.g2_KxE = first_factor(rank_g), nnx.Param(
            lora_out_init(rngs.params(), rank_g, e))
        # xi (the removal key's scale), alpha (the replacement key's mix of a), rho (the bonus).
        self.k_k_E = nnx.Param(jnp.asarray(0.71 - 0.1 * linear, jnp.float32))
        self.k_a_E = nnx.Param(jnp.full((e,), 1.02, jnp.float32))
        self.r_k_HxD = nnx.Param(jnp.full((h, d), -0.04, jnp.float32))
        self.norm_scale_E = nnx.Param(jnp.ones((e,)))
        self.norm_bias_E = nnx.Param(jnp.zeros((e,)))
        out_init = (nnx.initializers.zeros if cfg.zero_init else nnx.initializers.lecun_normal())
        self.out_ExE = nnx.Param(out_init(rngs.params(), (e, e)))

    @classmethod
    def tie_layers(cls, modules: list[RWKV7Mixer]) -> None:
        """Nothing is tied: the one hook that sees every layer (first first) sets each one's
        depth-dependent init (the token-shift mixes and w0), as the paper's code does."""
        for layer, module in enumerate(modules):
            mix_6xE, w0_E = depth_inits(module.width, module.head_dim, layer, len(modules))
            module.mix_6xE[...] = jnp.asarray(mix_6xE, module.mix_6xE[...].dtype)
            module.w0_E[...] = jnp.asarray(w0_E, module.w0_E[...].dtype)

    def inputs(self, x_BxLxE: jax.Array, mask_BxL: jax.Array):
        """(r, log w, k~, v, kh, a) [B, L, H, D] each and x^g [B, L, E]: the token shift, the
        projections and the w, a LoRAs; log w, k~, v and kh zero at padding (the state is held)."""
        b, length, _ = x_BxLxE.shape
        heads = lambda x: x.reshape(b, length, self.num_heads, self.head_dim)
        real_BxLx1 = mask_BxL[:, :, None]
        x_BxLxE = jnp.where(real_BxLx1, x_BxLxE, 0.0)
        previous_BxLxE = jnp.pad(x_BxLxE, [(0, 0), (1, 0), (0, 0)])[:, :length]
        # x^c = x + (x_{t-1} - x) mu_c for the six c: [6, B, L, E].
        shifted_6xBxLxE = x_BxLxE + (previous_BxLxE - x_BxLxE) * self.mix_6xE[...][:, None, None]
        x_r, x_w, x_k, x_v, x_a, x_g = shifted_6xBxLxE
        r_BxLxE, k_BxLxE, v_BxLxE = (x @ w_ExE for x, w_ExE in zip((x_r, x_k, x_v),
                                                                    self.rkv_3xExE[...]))
        d_BxLxE = self.w0_E[...] + jnp.tanh(x_w @ self.w1_ExK[...]) @ self.w2_KxE[...]
        log_w_BxLxE = -DECAY_FLOOR * jax.nn.sigmoid(d_BxLxE)
        a_BxLxE = jax.nn.sigmoid(self.a0_E[...] + (x_a @ self.a1_ExK[...]) @ self.a2_KxE[...])
        kh_BxLxHxD = l2_normalize(heads(k_BxLxE * self.k_k_E[...]))
        kt_BxLxE = k_BxLxE * (1.0 + (a_BxLxE - 1.0) * self.k_a_E[...])
        held = lambda x: jnp.where(real_BxLx1[..., None], heads(x), 0.0)
        return (heads(r_BxLxE), held(log_w_BxLxE), held(kt_BxLxE), held(v_BxLxE),
                jnp.where(real_BxLx1[..., None], kh_BxLxHxD, 0.0), heads(a_BxLxE),
                x_g)

    def wkv(self, r, log_w, kt, v, kh, a, form: str = "chunkwise") -> jax.Array:
        """o [B, L, H, D] before the norm: the causal pass (+ the reversed one, summed); `form`
        chunkwise (what trains) or recurrent (the reference)."""
        b = r.shape[0]
        directions = 2 if self.cfg.bidirectional else 1
        both = lambda x: jnp.concatenate([x, x[:, ::-1]][:directions])  # on the batch axis
        args = tuple(both(x) for x in (r, log_w, kt, v, -kh, a * kh))
        if form == "chunkwise":
            o_xLxHxD = wkv7_chunkwise(*args, self.cfg.chunk_size)
        elif form == "recurrent":
            o_xLxHxD = wkv7_recurrent(*args)
        else:
            raise ValueError(f"form={form!r}; use chunkwise or recurrent")
        return o_xLxHxD if directions == 1 else o_xLxHxD[:b] + o_xLxHxD[b:, ::-1]

    def output(self, o_BxLxHxD, r_BxLxHxD, kt_BxLxHxD, v_BxLxHxD, x_g_BxLxE) -> jax.Array:
        """(g * (GroupNorm_h(o) + bonus)) W_o [B, L, E]."""
        b, length, h, d = o_BxLxHxD.shape
        mean_BxLxHx1 = o_BxLxHxD.mean(-1, keepdims=True)
        var_BxLxHx1 = jnp.mean((o_BxLxHxD - mean_BxLxHx1) ** 2, -1, keepdims=True)
        normed_BxLxHxD = ((o_BxLxHxD - mean_BxLxHx1)
                          * jax.lax.rsqrt(var_BxLxHx1 + NORM_EPS_PER_CHANNEL * d))
        normed_BxLxE = (normed_BxLxHxD.reshape(b, length, h * d) * self.norm_scale_E[...]
                        + self.norm_bias_E[...])
        bonus_BxLxHx1 = jnp.sum(r_BxLxHxD * kt_BxLxHxD * self.r_k_HxD[...], -1, keepdims=True)
        bonus_BxLxE = (bonus_BxLxHx1 * v_BxLxHxD).reshape(b, length, h * d)
        gate_BxLxE = jax.nn.sigmoid(x_g_BxLxE @ self.g1_ExK[...]) @ self.g2_KxE[...]
        return (gate_BxLxE * (normed_BxLxE + bonus_BxLxE)) @ self.out_ExE[...]

    def mix(self, x_BxLxE, mask_BxL, form: str = "chunkwise"):
        """The block; `form` chunkwise (what trains) or recurrent (tests: the reference)."""
        r, log_w, kt, v, kh, a, x_g = self.inputs(x_BxLxE, mask_BxL)
        return self.output(self.wkv(r, log_w, kt, v, kh, a, form), r, kt, v, x_g)
