"""BigBird ITC block-sparse attention (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062).

The padded sequence is cut into nb blocks of `block_size` tokens. The first and last blocks are
global: their queries attend to every key and every query attends to their keys. Every other
("middle") query block i attends to the sliding window of key blocks {i-1, i, i+1}, the two
global blocks and `num_rand_blocks` random key blocks drawn per head and per query block from
the blocks outside its window and the globals, fixed at init. The draw is uniform (the paper's)
or, with `random_decay_exponent` a > 0, without replacement with P(j) proportional to |i-j|^-a
(Kleinberg's small-world links, see BigBirdConfig).

Middle query blocks score their keys piece by piece, each piece one batched einsum over all
blocks: the window as three shifted slices of the blocked keys, the two global blocks directly,
and the random blocks gathered with one take; a single softmax spans the pieces. The two global
query blocks are full rows over all L keys. Time and memory O(L * (5 + r) * block_size +
2 * block_size * L): linear in L.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (AttentionConfig, Buffer, ExactSoftmax, blocks_head_major,
                                       pad_to_blocks, register, unblock_head_major)
from lra.models.attention.softmax import softmax_pieces

NUM_FIXED_BLOCKS = 5  # 2 global + 3 window key blocks per middle query block


@dataclasses.dataclass
class BigBirdConfig(AttentionConfig):
    kind: str = "bigbird"
    block_size: int = 64  # LRA / paper default (from_block_size = to_block_size = 64)
    num_rand_blocks: int = 3  # LRA / paper default
    # Seed of the fixed random pattern. None: drawn from rngs.params(), so every layer gets its
    # own pattern (as LRA's per-layer connectivity_seed); an int fixes it for every layer.
    seed: int | None = None
    # Power-law exponent a of the random links: query block i draws its random key blocks without
    # replacement with P(j) proportional to |i - j|^-a over its candidates. 0 = uniform (the
    # paper / LRA). A power law, not exp(-|i-j|/scale), because it has no length scale to tie to
    # L, and a = 1 (the sequence's dimension) is Kleinberg's unique navigable exponent: greedy
    # routing over window + such links takes O(log^2 n) hops, polynomially many for any other a
    # (J. Kleinberg, "The small-world phenomenon: an algorithmic perspective", STOC 2000).
    random_decay_exponent: float = 0.0

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: 16 blocks of L/16 (2 global + 3 window + 3 random of them); the default
        blocks of 64 leave 4 blocks at L=256."""
        return {"block_size": seq_len // 16}


def random_block_indices(priority_HxNxN: jax.Array, num_blocks: int, num_rand: int,
                         decay_exponent: float = 0.0) -> jax.Array:
    """int32[H, nb-2, r]: per head and middle query block i, the r random key blocks.

    Candidates for row i are the non-global blocks outside the window {i-1, i, i+1}. With
    `decay_exponent` a = 0, the r highest i.i.d. uniform priorities among them: a uniform draw
    without replacement. With a > 0, Gumbel-top-k (Kool et al. 2019): the r highest
    -a * log|i-j| + Gumbel noise, i.e. successive draws without replacement with P(j) ~ |i-j|^-a.
    """
    rows_T = jnp.arange(1, num_blocks - 1)
    cols_N = jnp.arange(num_blocks)
    distance_TxN = jnp.abs(cols_N[None, :] - rows_T[:, None])
    outside_window_TxN = distance_TxN > 1
    not_global_N = (cols_N > 0) & (cols_N < num_blocks - 1)
    candidate_TxN = outside_window_TxN & not_global_N[None, :]
    priority_HxTxN = priority_HxNxN[:, 1:num_blocks - 1, :num_blocks]
    if decay_exponent == 0.0:  # the paper's uniform draw, kept bit-for-bit
        priority_HxTxN = jnp.where(candidate_TxN[None], priority_HxTxN, -1.0)
    else:
        # u in [0, 1) -> Gumbel(0, 1) = -log(-log(1 - u)); u = 0 gives +inf, still a candidate.
        gumbel_HxTxN = -jnp.log(-jnp.log1p(-priority_HxTxN))
        log_weight_TxN = -decay_exponent * jnp.log(jnp.maximum(distance_TxN, 1).astype(
            priority_HxTxN.dtype))
        priority_HxTxN = jnp.where(candidate_TxN[None], gumbel_HxTxN + log_weight_TxN[None],
                                   -jnp.inf)
    _, index_HxTxA = jax.lax.top_k(priority_HxTxN, num_rand)
    return index_HxTxA.astype(jnp.int32)


@register
class BigBirdAttention(ExactSoftmax):
    """BigBird ITC: window + global + random key blocks, gathered per middle query block."""

    config_cls = BigBirdConfig
    check_settings = {'block_size': 16, 'num_rand_blocks': 2}  # lra.check: small-but-real
    # Growth at the defaults (block 64, r = 3). The largest intermediate, the random-block scores
    # [B, H, nb - 2, bs, r bs], is linear in L - 2 bs: the two global query blocks are not middle
    # blocks. That fixed part makes L and 2 L look super-linear while nb is small (512 -> 1024:
    # 896 / 384 = 2.33x, "L^1.22"), so the exponent is measured from 16 blocks on (1024 -> 4096:
    # L^1.07, -> 1.0 as L grows). The fixed draw's [H, nb, nb] priorities are O((L / bs)^2) but
    # stay below the random scores up to nb = r bs^2 (L = 786K at the defaults).
    growth_settings = {"block_size": 64, "num_rand_blocks": 3}
    growth_lengths = (1024, 4096)

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        max_blocks = -(-self.max_len // cfg.block_size)
        if cfg.seed is None:
            seed = np.asarray(jax.random.key_data(rngs.params())).astype(np.uint32).ravel()
        else:
            seed = cfg.seed
        gen = np.random.default_rng(seed)
        # The fixed random draw: i.i.d. uniform priorities per (head, query block, key block).
        # The pattern at nb <= max_blocks blocks is the top-r candidates of its [:nb, :nb]
        # corner, so shorter call lengths get a valid draw too (uniform, or distance-weighted:
        # the weights depend on |i - j| only). Stored as floats (not int indices) so the module
        # state stays differentiable-typed for jax.grad over it.
        priority = gen.random((self.num_heads, max_blocks, max_blocks), dtype=np.float32)
        self.rand_priority = Buffer(jnp.asarray(priority))

    def random_blocks(self, num_blocks: int) -> jax.Array:
        """int32[H, nb-2, r]: random key blocks of middle query blocks 1..nb-2 at nb blocks."""
        r = self.cfg.num_rand_blocks
        if r == 0:
            return jnp.zeros((self.num_heads, num_blocks - 2, 0), jnp.int32)
        # Integer-valued: no gradient flows into the fixed draw.
        priority_HxNxN = jax.lax.stop_gradient(self.rand_priority[...])
        return random_block_indices(priority_HxNxN, num_blocks, r,
                                    float(self.cfg.random_decay_exponent))

    @classmethod
    def check_seq_len(cls, cfg: BigBirdConfig, seq_len: int) -> None:
        bs, r = cfg.block_size, cfg.num_rand_blocks
        if bs < 1 or r < 0:
            raise ValueError(f"bigbird needs model.attention.block_size >= 1 and "
                             f"model.attention.num_rand_blocks >= 0 (got {bs}, {r})")
        a = cfg.random_decay_exponent
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"bigbird needs model.attention.random_decay_exponent >= 0 and "
                             f"finite (0 = uniform random blocks, 1 = Kleinberg's; got {a})")
        need = NUM_FIXED_BLOCKS + r
        if -(-seq_len // bs) < need:
            raise ValueError(
                f"bigbird needs >= {need} blocks (2 global + 3 window + "
                f"model.attention.num_rand_blocks={r}) of model.attention.block_size={bs}, "
                f"i.e. task.seq_len > {(need - 1) * bs} (got {seq_len}); lower "
                f"model.attention.block_size / model.attention.num_rand_blocks or raise "
                f"task.seq_len")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        bs = self.cfg.block_size
        length = q_BxLxHxD.shape[1]
        mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            bs, mask_BxL, q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5, k_BxLxHxD, v_BxLxHxD)
        b, padded = mask_BxP.shape
        # Heads-major blocked layout so every einsum below batches over (b, h[, block]).
        q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD = (blocks_head_major(x, bs)
                                                 for x in (q_BxPxHxD, k_BxPxHxD, v_BxPxHxD))
        key_ok_BxNxS = mask_BxP.reshape(b, padded // bs, bs)

        drop = self.drop(rng)
        out_mid_BxHxTxSxD = self._middle_blocks(q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD,
                                                key_ok_BxNxS, bias,
                                                None if drop is None else drop.piece(0))
        out_glob_BxHx2xSxD = self._global_blocks(q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD,
                                                 mask_BxP, bias,
                                                 None if drop is None else drop.piece(1))
        out_BxHxNxSxD = jnp.concatenate([out_glob_BxHx2xSxD[:, :, :1], out_mid_BxHxTxSxD,
                                         out_glob_BxHx2xSxD[:, :, 1:]], axis=2)
        return unblock_head_major(out_BxHxNxSxD)[:, :length]

    def _global_blocks(self, q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD, mask_BxP, bias,
                       drop=None) -> jax.Array:
        """First and last query blocks: full softmax rows over all keys, O(2 * bs * L)."""
        b, h, nb, bs, d = q_BxHxNxSxD.shape
        q_BxHxGxD = jnp.concatenate([q_BxHxNxSxD[:, :, :1], q_BxHxNxSxD[:, :, -1:]],
                                    axis=2).reshape(b, h, 2 * bs, d)
        k_BxHxPxD = k_BxHxNxSxD.reshape(b, h, nb * bs, d)
        v_BxHxPxD = v_BxHxNxSxD.reshape(b, h, nb * bs, d)
        scores_BxHxGxP = jnp.einsum("bhgd,bhpd->bhgp", q_BxHxGxD, k_BxHxPxD)
        if bias is not None:  # rows: positions of blocks 0 and nb-1; columns: all keys
            pos_S, pos_P = jnp.arange(bs), jnp.arange(nb * bs)
            query_pos_G = jnp.concatenate([pos_S, (nb - 1) * bs + pos_S])
            scores_BxHxGxP = scores_BxHxGxP + bias(
                query_pos_G[:, None] - pos_P[None, :], scores_BxHxGxP.dtype)[None]
        out_BxHxGxD = softmax_pieces([scores_BxHxGxP], [("bhgp,bhpd->bhgd", v_BxHxPxD)], drop,
                                     [mask_BxP[:, None, None, :]])
        return out_BxHxGxD.reshape(b, h, 2, bs, d)

    def _middle_blocks(self, q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD, key_ok_BxNxS, bias,
                       drop=None) -> jax.Array:
        """Query blocks 1..nb-2 over window + global + random key blocks, each counted once."""
        b, h, nb, bs, d = q_BxHxNxSxD.shape
        m = nb - 2
        q_BxHxTxSxD = q_BxHxNxSxD[:, :, 1:-1]
        dtype = q_BxHxTxSxD.dtype
        # Bias: query s of middle block i = 1 + row sits at i*bs + s; every key piece below
        # knows the positions of its gathered key blocks, so its bias has the piece's shape.
        pos_S = jnp.arange(bs)
        query_pos_TxS = jnp.arange(1, nb - 1)[:, None] * bs + pos_S[None, :]

        # Window {i-1, i, i+1}: three shifted slices of the blocked keys, one score piece each
        # (no concatenated copy of K/V). Block i-1 = 0 for i = 1 and block i+1 = nb-1 for
        # i = nb-2 are already global key blocks: drop them here so each key is counted once.
        row_T = jnp.arange(1, nb - 1)
        not_dup_T = {0: row_T != 1, 1: None, 2: row_T != nb - 2}
        scores, values, allowed = [], [], []
        for shift, keep_T in not_dup_T.items():
            scores.append(jnp.einsum("bhmsd,bhmtd->bhmst", q_BxHxTxSxD,
                                     k_BxHxNxSxD[:, :, shift:shift + m]))
            if bias is not None:  # key block i - 1 + shift: i - j = (1 - shift)*bs + s - t
                bias_HxSxS = bias((1 - shift) * bs + pos_S[:, None] - pos_S, dtype)
                scores[-1] = scores[-1] + bias_HxSxS[None, :, None]
            values.append(("bhmst,bhmtd->bhmsd", v_BxHxNxSxD[:, :, shift:shift + m]))
            ok_BxTxS = key_ok_BxNxS[:, shift:shift + m]
            if keep_T is not None:
                ok_BxTxS = ok_BxTxS & keep_T[None, :, None]
            allowed.append(ok_BxTxS[:, None, :, None, :])
        # Global key blocks: one matmul over all middle queries per (b, h), no broadcast copy.
        for blk in (0, -1):
            scores.append(jnp.einsum("bhmsd,bhtd->bhmst", q_BxHxTxSxD, k_BxHxNxSxD[:, :, blk]))
            if bias is not None:
                key_pos_S = (blk % nb) * bs + pos_S
                bias_HxTxSxS = bias(query_pos_TxS[..., None] - key_pos_S, dtype)
                scores[-1] = scores[-1] + bias_HxTxSxS[None]
            values.append(("bhmst,bhtd->bhmsd", v_BxHxNxSxD[:, :, blk]))
            allowed.append(key_ok_BxNxS[:, None, None, None, blk])

        r = self.cfg.num_rand_blocks
        if r > 0:
            # Gather the r random key/value blocks of every (head, query block) in one take.
            index_HxTxA = self.random_blocks(nb)
            head_Hx1x1 = jnp.arange(h)[:, None, None]
            k_rnd_BxHxTxWxD = k_BxHxNxSxD[:, head_Hx1x1, index_HxTxA].reshape(b, h, m, r * bs, d)
            v_rnd_BxHxTxWxD = v_BxHxNxSxD[:, head_Hx1x1, index_HxTxA].reshape(b, h, m, r * bs, d)
            rnd_ok_BxHxTx1xW = key_ok_BxNxS[:, index_HxTxA].reshape(b, h, m, 1, r * bs)
            scores.append(jnp.einsum("bhmsd,bhmtd->bhmst", q_BxHxTxSxD, k_rnd_BxHxTxWxD))
            if bias is not None:  # the gathered blocks' positions differ per head: [H, T, S, W]
                key_pos_HxTxW = (index_HxTxA[..., None] * bs + pos_S).reshape(h, m, r * bs)
                distance_HxTxSxW = query_pos_TxS[None, :, :, None] - key_pos_HxTxW[:, :, None]
                scores[-1] = scores[-1] + bias.per_head(distance_HxTxSxW, dtype)[None]
            values.append(("bhmst,bhmtd->bhmsd", v_rnd_BxHxTxWxD))
            allowed.append(rnd_ok_BxHxTx1xW)
        return softmax_pieces(scores, values, drop, allowed)

    def block_pattern(self, num_blocks: int) -> jax.Array:
        """Test-only: bool[H, nb, nb], which key blocks each query block may see."""
        rows_N, cols_N = jnp.arange(num_blocks)[:, None], jnp.arange(num_blocks)[None, :]
        glob_N = lambda x: (x == 0) | (x == num_blocks - 1)  # noqa: E731
        fixed_NxN = glob_N(rows_N) | glob_N(cols_N) | (jnp.abs(rows_N - cols_N) <= 1)
        index_HxTxA = self.random_blocks(num_blocks)
        rand_HxTxN = (index_HxTxA[..., None] == jnp.arange(num_blocks)).any(axis=2)
        rand_HxNxN = jnp.pad(rand_HxTxN, ((0, 0), (1, 1), (0, 0)))
        return fixed_NxN[None] | rand_HxNxN

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        bs = self.cfg.block_size
        length = q_BxLxHxD.shape[1]
        blocks_HxNxN = self.block_pattern(-(-length // bs))
        tokens_HxPxP = jnp.repeat(jnp.repeat(blocks_HxNxN, bs, axis=1), bs, axis=2)
        return tokens_HxPxP[None, :, :length, :length] & mask_BxL[:, None, None, :]
