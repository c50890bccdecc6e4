"""S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
Models").

Per channel e (emb_dim of them) a diagonal SSM of N/2 complex-conjugate state pairs, S4D-Lin
init A_n = -1/2 + i*pi*n, B = 1, C ~ CN(0, 1), learned step dt, zero-order hold:
    Abar = exp(dt*A),  Bbar = (exp(dt*A) - 1) / A * B,
    K[l] = 2 * Re(sum_n C_n * Bbar_n * Abar_n^l)          (Vandermonde, O(N L) per channel)
    y = K * u + D u                                        (causal conv, FFT of length 2L)
Bidirectional (S4's LRA models): a second kernel, with its own C and the same A and dt, runs on
the reversed sequence and the two are summed; both sit in one length-2L circular kernel, so one
FFT serves both. Then GELU and an output Linear. Time O(E N L + E L log L), no L x L array.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import AttentionConfig, SSMParam, TokenMixer, register


@dataclasses.dataclass
class S4DConfig(AttentionConfig):
    kind: str = "s4d"
    # N: state size per channel, N/2 complex-conjugate pairs (S4D's default d_state=64).
    state_dim: int = 64
    # Forward + backward kernels summed (S4's bidirectional LRA models); False = causal.
    bidirectional: bool = True
    # log dt ~ U[log dt_min, log dt_max] per channel (S4D's defaults).
    dt_min: float = 1e-3
    dt_max: float = 1e-1


@register
class S4DMixer(TokenMixer):
    """u -> GELU(SSM conv(u) + D u) -> Linear, every channel its own diagonal SSM."""

    config_cls = S4DConfig

    @classmethod
    def check_seq_len(cls, cfg: S4DConfig, seq_len: int) -> None:
        if cfg.state_dim < 2 or cfg.state_dim % 2 or not 0 < cfg.dt_min <= cfg.dt_max:
            raise ValueError(f"s4d needs an even model.attention.state_dim >= 2 and "
                             f"0 < dt_min <= dt_max (got {cfg.state_dim}, {cfg.dt_min}, "
                             f"{cfg.dt_max}); fix them for task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, k = self.width, cfg.state_dim // 2
        directions = 2 if cfg.bidirectional else 1
        self.log_dt_E = SSMParam(jax.random.uniform(
            rngs.params(), (e,), minval=math.log(cfg.dt_min), maxval=math.log(cfg.dt_max)))
        # A = -exp(log_a_real) + i * a_imag; S4D-Lin: Re A = -1/2, Im A = pi * n. Saved
        # parameters keep the paper's letter N for the state axis (K in base.py's table).
        self.log_a_real_ExN = SSMParam(jnp.full((e, k), math.log(0.5)))
        self.a_imag_ExN = SSMParam(jnp.broadcast_to(math.pi * jnp.arange(k, dtype=jnp.float32),
                                                     (e, k)))
        # C complex standard normal: real and imaginary parts each N(0, 1/2); [..., 0] = Re.
        self.c_CxExNx2 = nnx.Param(
            jax.random.normal(rngs.params(), (directions, e, k, 2)) * math.sqrt(0.5))
        self.d_E = nnx.Param(jax.random.normal(rngs.params(), (e,)))
        self.out = nnx.Linear(e, e, rngs=rngs)

    def discretize(self) -> tuple[jax.Array, jax.Array]:
        """(dt*A [E, K], C*Bbar [C, E, K]) under zero-order hold with B = 1."""
        a_ExK = -jnp.exp(self.log_a_real_ExN[...]) + 1j * self.a_imag_ExN[...]
        dta_ExK = jnp.exp(self.log_dt_E[...])[:, None] * a_ExK
        c_CxExK = self.c_CxExNx2[..., 0] + 1j * self.c_CxExNx2[..., 1]
        return dta_ExK, c_CxExK * (jnp.exp(dta_ExK) - 1.0) / a_ExK

    def kernels(self, length: int) -> jax.Array:
        """K [C, E, L]: K[c, e, l] = 2 Re(sum_n (C Bbar)[c, e, n] exp(dt A[e, n] * l))."""
        dta_ExK, cb_CxExK = self.discretize()
        return vandermonde_kernel(dta_ExK, cb_CxExK, length)

    def ssm(self, u_BxLxE: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        """The linear SSM part: conv(u, K_fwd) + reverse-conv(u, K_bwd) + D u, padding zeroed."""
        length = u_BxLxE.shape[1]
        u_BxLxE = jnp.where(mask_BxL[:, :, None], u_BxLxE, 0.0)
        k_CxExL = self.kernels(length)
        # Circular kernel of length 2L: offset m >= 0 (y_t gets u_{t-m}) at index m, offset
        # -m (y_t gets u_{t+m}, backward) at index 2L - m; index L (offset +-L) never occurs.
        k_Ex2L = jnp.pad(k_CxExL[0], ((0, 0), (0, length)))
        if k_CxExL.shape[0] == 2:
            back_ExL = k_CxExL[1]
            k_Ex2L = k_Ex2L.at[:, 0].add(back_ExL[:, 0])
            k_Ex2L = k_Ex2L.at[:, length + 1:].add(back_ExL[:, :0:-1])
        u_f = jnp.fft.rfft(u_BxLxE, n=2 * length, axis=1)
        k_f = jnp.fft.rfft(k_Ex2L, n=2 * length, axis=-1).T
        y_BxLxE = jnp.fft.irfft(u_f * k_f[None], n=2 * length, axis=1)[:, :length]
        return y_BxLxE.astype(u_BxLxE.dtype) + self.d_E[...] * u_BxLxE

    def mix(self, x_BxLxE, mask_BxL):
        return self.out(jax.nn.gelu(self.ssm(x_BxLxE, mask_BxL)))


def vandermonde_kernel(dta_ExK: jax.Array, cb_CxExK: jax.Array, length: int) -> jax.Array:
    """2 Re(sum_n cb[c, e, n] exp(dta[e, n] * l)) for l < length, in O(C E K L), never L x L.

    With l = J * i + j (J ~ sqrt L), exp(dta l) = exp(dta J i) * exp(dta j): two E x K x sqrt(L)
    exponential tables and a batched matmul over n replace E x K x L complex exponentials, and no
    E x K x L array is formed.
    """
    s = math.isqrt(length - 1) + 1
    hi = -(-length // s)
    z_lo_ExKxJ = jnp.exp(dta_ExK[:, :, None] * jnp.arange(s, dtype=jnp.float32))
    z_hi_ExKxI = jnp.exp(dta_ExK[:, :, None] * (s * jnp.arange(hi, dtype=jnp.float32)))
    k_CxExIxJ = jnp.einsum("cen,eni,ens->ceis", cb_CxExK, z_hi_ExKxI, z_lo_ExKxJ)
    c, e = k_CxExIxJ.shape[:2]
    return 2.0 * k_CxExIxJ.reshape(c, e, hi * s)[..., :length].real
