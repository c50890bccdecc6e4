"""Bidirectional LSTM token mixer (Hochreiter & Schmidhuber 1997), the recurrent LRA baseline.

A real sequential `jax.lax.scan` over the length axis: O(L) steps of O(E^2) work each, no
parallelism along L. Gates i, f, g, o come from [x_t, h_{t-1}]; the input half of that product
is computed for all steps at once before the scan, only the recurrent half runs inside it.
Bidirectional (the default, LRA is an encoder task): a forward and a backward LSTM with hidden
size emb_dim / 2 each, concatenated. The backward LSTM scans the flipped sequence inside the same
`lax.scan` as the forward one (equal to a second `reverse=True` scan, at half the sequential
steps). At padded steps the state is held, so padding never reaches a real output and the
backward LSTM starts from a zero state at the last real token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import AttentionConfig, TokenMixer, register


@dataclasses.dataclass
class LSTMConfig(AttentionConfig):
    kind: str = "lstm"
    # Forward + backward LSTMs of emb_dim / 2 each, concatenated; False = one LSTM of emb_dim.
    bidirectional: bool = True


def lstm_cell(gates_Bx4K: jax.Array, c_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """c' = f * c + i * g, h' = o * tanh(c'), gates laid out [i | f | g | o]."""
    i_BxK, f_BxK, g_BxK, o_BxK = jnp.split(gates_Bx4K, 4, axis=-1)
    c_BxK = jax.nn.sigmoid(f_BxK) * c_BxK + jax.nn.sigmoid(i_BxK) * jnp.tanh(g_BxK)
    return jax.nn.sigmoid(o_BxK) * jnp.tanh(c_BxK), c_BxK


@register
class LSTMMixer(TokenMixer):
    """(Bi)LSTM over the block's normalised input; the hidden states are the residual branch."""

    config_cls = LSTMConfig

    def init_variables(self, rngs: nnx.Rngs) -> None:
        emb_dim = self.width
        if self.cfg.bidirectional and emb_dim % 2:
            raise ValueError(f"lstm with model.attention.bidirectional=true needs an even "
                             f"model.emb_dim (got {emb_dim}); each direction has emb_dim / 2")
        directions = 2 if self.cfg.bidirectional else 1
        self.hidden = emb_dim // directions
        k = self.hidden
        # Per direction c: gates = x_t @ w_x[c] + h_{t-1} @ w_h[c] + bias[c], laid out [i|f|g|o].
        lecun = nnx.initializers.lecun_normal(batch_axis=(0,))  # fan-in emb_dim per direction
        self.w_x_CxEx4K = nnx.Param(lecun(rngs.params(), (directions, emb_dim, 4 * k)))
        self.w_h_CxKx4K = nnx.Param(
            nnx.initializers.orthogonal(column_axis=-1)(rngs.params(), (directions, k, 4 * k)))
        # Forget-gate bias 1 (Jozefowicz et al. 2015): remember by default at the start of training.
        self.bias_Cx4K = nnx.Param(jnp.zeros((directions, 4 * k)).at[:, k:2 * k].set(1.0))

    def mix(self, x_BxLxE, mask_BxL):
        b = x_BxLxE.shape[0]
        directions = self.w_x_CxEx4K.shape[0]
        # Both directions in one scan: direction 1 reads the flipped sequence (its leading
        # padding then holds the zero state until the last real token).
        x_CxLxBxE = jnp.stack([x_BxLxE, x_BxLxE[:, ::-1]][:directions]).transpose(0, 2, 1, 3)
        real_CxLxB = jnp.stack([mask_BxL, mask_BxL[:, ::-1]][:directions]).transpose(0, 2, 1)
        gates_in_LxCxBx4K = (jnp.einsum("clbe,ceg->lcbg", x_CxLxBxE, self.w_x_CxEx4K[...])
                             + self.bias_Cx4K[...][None, :, None])
        w_h_CxKx4K = self.w_h_CxKx4K[...]

        def step(carry, inputs):
            h_CxBxK, c_CxBxK = carry
            gates_in_CxBx4K, real_CxBx1 = inputs
            gates_CxBx4K = gates_in_CxBx4K + jnp.einsum("cbk,ckg->cbg", h_CxBxK, w_h_CxKx4K)
            new_h_CxBxK, new_c_CxBxK = lstm_cell(gates_CxBx4K, c_CxBxK)
            # Padded steps hold the state: padding never reaches a real output.
            h_CxBxK = jnp.where(real_CxBx1, new_h_CxBxK, h_CxBxK)
            c_CxBxK = jnp.where(real_CxBx1, new_c_CxBxK, c_CxBxK)
            return (h_CxBxK, c_CxBxK), h_CxBxK

        zeros_CxBxK = jnp.zeros((directions, b, self.hidden), x_BxLxE.dtype)
        _, h_LxCxBxK = jax.lax.scan(step, (zeros_CxBxK, zeros_CxBxK),
                                    (gates_in_LxCxBx4K, real_CxLxB.transpose(1, 0, 2)[..., None]))
        out_BxLxE = h_LxCxBxK[:, 0].transpose(1, 0, 2)
        if directions == 2:
            out_BxLxE = jnp.concatenate([out_BxLxE, h_LxCxBxK[::-1, 1].transpose(1, 0, 2)], -1)
        return out_BxLxE
