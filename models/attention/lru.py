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

from lra.models.attention.base import AttentionConfig, SSMParam, TokenMixer, register


@dataclasses.dataclass
class LRUConfig(AttentionConfig):
    kind: str = "lru"
    # N (K in base.py's letters): complex hidden states.
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
class LRUMixer(TokenMixer):
    """u -> Re(C x) + D u, x the LRU states of u (both directions when bidirectional)."""

    config_cls = LRUConfig

    @classmethod
    def check_seq_len(cls, cfg: LRUConfig, seq_len: int) -> None:
        if cfg.state_dim < 1 or not 0.0 <= cfg.r_min < cfg.r_max < 1.0 or cfg.max_phase <= 0:
            raise ValueError(f"lru needs model.attention.state_dim >= 1, 0 <= r_min < r_max < 1 "
                             f"and max_phase > 0 (got {cfg.state_dim}, {cfg.r_min}, {cfg.r_max}, "
                             f"{cfg.max_phase}); fix them for task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, k = self.width, cfg.state_dim
        directions = 2 if cfg.bidirectional else 1
        # |lambda|^2 ~ U[r_min^2, r_max^2] (uniform on the ring), phase ~ U[0, max_phase].
        u1_K, u2_K = jax.random.uniform(rngs.params(), (2, k))
        nu_K = -0.5 * jnp.log(u1_K * (cfg.r_max ** 2 - cfg.r_min ** 2) + cfg.r_min ** 2)
        # Saved parameters keep the paper's letter N for the state axis (K in base.py's table).
        self.nu_log_N = SSMParam(jnp.log(nu_K))
        self.theta_log_N = SSMParam(jnp.log(cfg.max_phase * u2_K))
        self.gamma_log_N = SSMParam(0.5 * jnp.log(1.0 - jnp.exp(-2.0 * nu_K)))
        # Glorot-like complex inits from the paper: B ~ CN(0, 1/E) per entry, C ~ CN(0, 1/N).
        self.b_NxEx2 = nnx.Param(
            jax.random.normal(rngs.params(), (k, e, 2)) / math.sqrt(2 * e))
        self.c_CxExNx2 = nnx.Param(
            jax.random.normal(rngs.params(), (directions, e, k, 2)) / math.sqrt(k))
        self.d_E = nnx.Param(jax.random.normal(rngs.params(), (e,)))

    def lam(self) -> jax.Array:
        """The diagonal of the state matrix, complex [K], |lambda| < 1."""
        return jnp.exp(-jnp.exp(self.nu_log_N[...]) + 1j * jnp.exp(self.theta_log_N[...]))

    def inputs(self, u_BxLxE: jax.Array) -> jax.Array:
        """gamma * (B u_k), complex [B, L, K]."""
        b_KxE = self.b_NxEx2[..., 0] + 1j * self.b_NxEx2[..., 1]
        b_KxE = b_KxE * jnp.exp(self.gamma_log_N[...])[:, None]
        return jnp.einsum("ne,ble->bln", b_KxE, u_BxLxE.astype(b_KxE.dtype))

    def states(self, bu_xLxK: jax.Array) -> jax.Array:
        """x_k = lambda x_{k-1} + bu_k from x_0 = 0, by an associative scan along L."""
        # lambda^k pairs are the same for every sequence: carry them once, not per sequence.
        lam_1xLxK = jnp.broadcast_to(self.lam(), (1,) + bu_xLxK.shape[1:])
        _, x_xLxK = jax.lax.associative_scan(linear_recurrence_op, (lam_1xLxK, bu_xLxK), axis=1)
        return x_xLxK

    def mix(self, x_BxLxE, mask_BxL):
        b = x_BxLxE.shape[0]
        # Zeroed padding: with the (end-)padded layout the backward scan then reaches the last
        # real token from a zero state, and the forward scan never reads padding at real steps.
        u_BxLxE = jnp.where(mask_BxL[:, :, None], x_BxLxE, 0.0)
        bu_BxLxK = self.inputs(u_BxLxE)
        c_CxExK = self.c_CxExNx2[..., 0] + 1j * self.c_CxExNx2[..., 1]
        if c_CxExK.shape[0] == 2:
            # Both directions in one scan: the backward one is the forward scan of the flipped
            # sequence, stacked on the batch axis (half the scan code to compile).
            x_2BxLxK = self.states(jnp.concatenate([bu_BxLxK, bu_BxLxK[:, ::-1]], axis=0))
            y_BxLxE = (jnp.einsum("en,bln->ble", c_CxExK[0], x_2BxLxK[:b])
                       + jnp.einsum("en,bln->ble", c_CxExK[1], x_2BxLxK[b:, ::-1])).real
        else:
            y_BxLxE = jnp.einsum("en,bln->ble", c_CxExK[0], self.states(bu_BxLxK)).real
        return y_BxLxE.astype(u_BxLxE.dtype) + self.d_E[...] * u_BxLxE
