"""LRU (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences").

A linear diagonal complex recurrence over N states with the model's E channels in and out:
    x_k = lambda * x_{k-1} + gamma * (B u_k),     y_k = Re(C x_k) + D u_k,
    lambda = exp(-exp(nu_log) + i exp(theta_log)),  gamma = sqrt(1 - |lambda|^2)   (normalisation)
with |lambda| drawn uniformly on the ring [r_min, r_max] and phase in [0, max_phase] (the paper's
Lemma 3.2 init). The recurrence is evaluated with `jax.lax.associative_scan` over
(lambda-power, state) pairs: O(L N) work, O(log L) depth, no L x L array. Bidirectional (as in
S5, which the LRU paper's LRA setup follows): a second recurrence runs backwards with the same
lambda, gamma and B (as the forward scan of the flipped sequence, in the same associative scan);
its states are read out by their own C and the two readouts are summed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import Attention, AttentionConfig, SSMParam, register


@dataclasses.dataclass
class LRUConfig(AttentionConfig):
    kind: str = "lru"
    # N: complex hidden states.
    state_dim: int = 128
    # Forward + backward scans, each read out by its own C, summed; False = causal.
    bidirectional: bool = True
    # Ring init of the eigenvalues (the paper's defaults; its LRA runs use r_min 0-0.9 per task).
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 6.28


def linear_recurrence_op(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]
                         ) -> tuple[jax.Array, jax.Array]:
    """Compose x -> a_l x + b_l, then x -> a_r x + b_r: (a_r a_l, a_r b_l + b_r)."""
    a_left, b_left = left
    a_right, b_right = right
    return a_right * a_left, a_right * b_left + b_right


@register
class LRUMixer(Attention):
    """u -> Re(C x) + D u, x the LRU states of u (both directions when bidirectional)."""

    config_cls = LRUConfig
    mixer = True

    @classmethod
    def check_seq_len(cls, cfg: LRUConfig, seq_len: int) -> None:
        if cfg.state_dim < 1 or not 0.0 <= cfg.r_min < cfg.r_max < 1.0 or cfg.max_phase <= 0:
            raise ValueError(f"lru needs model.attention.state_dim >= 1, 0 <= r_min < r_max < 1 "
                             f"and max_phase > 0 (got {cfg.state_dim}, {cfg.r_min}, {cfg.r_max}, "
                             f"{cfg.max_phase}); fix them for task.seq_len={seq_len}")

    def __init__(self, cfg: LRUConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, max_len=max_len, rngs=rngs)
        e, n = num_heads * head_dim, cfg.state_dim
        directions = 2 if cfg.bidirectional else 1
        # |lambda|^2 ~ U[r_min^2, r_max^2] (uniform on the ring), phase ~ U[0, max_phase].
        u1_N, u2_N = jax.random.uniform(rngs.params(), (2, n))
        nu_N = -0.5 * jnp.log(u1_N * (cfg.r_max ** 2 - cfg.r_min ** 2) + cfg.r_min ** 2)
        self.nu_log_N = SSMParam(jnp.log(nu_N))
        self.theta_log_N = SSMParam(jnp.log(cfg.max_phase * u2_N))
        self.gamma_log_N = SSMParam(0.5 * jnp.log(1.0 - jnp.exp(-2.0 * nu_N)))
        # Glorot-like complex inits from the paper: B ~ CN(0, 1/E) per entry, C ~ CN(0, 1/N).
        self.b_NxEx2 = nnx.Param(
            jax.random.normal(rngs.params(), (n, e, 2)) / math.sqrt(2 * e))
        self.c_CxExNx2 = nnx.Param(
            jax.random.normal(rngs.params(), (directions, e, n, 2)) / math.sqrt(n))
        self.d_E = nnx.Param(jax.random.normal(rngs.params(), (e,)))

    def lam(self) -> jax.Array:
        """The diagonal of the state matrix, complex [N], |lambda| < 1."""
        return jnp.exp(-jnp.exp(self.nu_log_N[...]) + 1j * jnp.exp(self.theta_log_N[...]))

    def inputs(self, u_BxLxE: jax.Array) -> jax.Array:
        """gamma * (B u_k), complex [B, L, N]."""
        b_NxE = self.b_NxEx2[..., 0] + 1j * self.b_NxEx2[..., 1]
        b_NxE = b_NxE * jnp.exp(self.gamma_log_N[...])[:, None]
        return jnp.einsum("ne,ble->bln", b_NxE, u_BxLxE.astype(b_NxE.dtype))

    def states(self, bu_SxLxN: jax.Array) -> jax.Array:
        """x_k = lambda x_{k-1} + bu_k from x_0 = 0, by an associative scan along L."""
        # lambda^k pairs are the same for every sequence: carry them once, not per sequence.
        lam_1xLxN = jnp.broadcast_to(self.lam(), (1,) + bu_SxLxN.shape[1:])
        _, x_SxLxN = jax.lax.associative_scan(linear_recurrence_op, (lam_1xLxN, bu_SxLxN), axis=1)
        return x_SxLxN

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        b, length, h, d = v_BxLxHxD.shape
        # Zeroed padding: with the (end-)padded layout the backward scan then reaches the last
        # real token from a zero state, and the forward scan never reads padding at real steps.
        u_BxLxE = jnp.where(mask_BxL[:, :, None], v_BxLxHxD.reshape(b, length, h * d), 0.0)
        bu_BxLxN = self.inputs(u_BxLxE)
        c_CxExN = self.c_CxExNx2[..., 0] + 1j * self.c_CxExNx2[..., 1]
        if c_CxExN.shape[0] == 2:
            # Both directions in one scan: the backward one is the forward scan of the flipped
            # sequence, stacked on the batch axis (half the scan code to compile).
            x_SxLxN = self.states(jnp.concatenate([bu_BxLxN, bu_BxLxN[:, ::-1]], axis=0))
            y_BxLxE = (jnp.einsum("en,bln->ble", c_CxExN[0], x_SxLxN[:b])
                       + jnp.einsum("en,bln->ble", c_CxExN[1], x_SxLxN[b:, ::-1])).real
        else:
            y_BxLxE = jnp.einsum("en,bln->ble", c_CxExN[0], self.states(bu_BxLxN)).real
        y_BxLxE = y_BxLxE.astype(u_BxLxE.dtype) + self.d_E[...] * u_BxLxE
        return y_BxLxE.reshape(b, length, h, d)
