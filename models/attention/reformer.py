"""Reformer LSH attention (Kitaev et al. 2020), bidirectional, shared-QK.

Keys are the L2-normalised queries (k_j = q_j / |q_j|), so similar vectors hash together.
For each of `n_hashes` rounds r a random rotation R_r [D, n_buckets/2] gives
  bucket_r(x) = argmax([x R_r ; -x R_r]).
Tokens are sorted by (bucket, position); the sorted sequence is cut into chunks of
`chunk_size`, and every chunk attends to itself and the previous chunk (wrapping around).
A token does not attend to itself unless it has no other key (finite -1e5 score, as in the
paper). Rounds are merged with their log-sum-exp weights; a key that a query sees in c of the
rounds gets its score lowered by log(c) (the paper's duplicate correction), so the result is
exactly softmax over the union of attended keys, each counted once.

Padding: padded tokens get bucket id n_buckets (beyond every real bucket), so they sort to the
end and never change which real keys a real query sees; padded keys are masked.
Cost O(n_hashes * L log L) for the sort and O(n_hashes * L * chunk_size) for attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import Attention, AttentionConfig, Buffer, pad_to_blocks, register
from lra.models.attention.softmax import NEG_INF, softmax_pieces_lse

SELF_SCORE = -1e5  # paper/trax value: self is used only when a query has no other key


@dataclasses.dataclass
class ReformerConfig(AttentionConfig):
    kind: str = "reformer"
    # Sorted-chunk length m; the brief's 64 (trax's enwik8 config also uses chunk_len = 64).
    chunk_size: int = 64
    # Hash rounds. The paper shows quality rising with rounds (1, 2, 4, 8) at linear cost;
    # trax's enwik8 reformer config uses 2. (LRA's port uses 1.)
    n_hashes: int = 2
    # Buckets per round; 0 = automatic: padded L / chunk_size rounded up to even, so the
    # average bucket is about one chunk and a query's two chunks cover its bucket.
    n_buckets: int = 0
    # Redraw the random rotations from `rng` every training step (paper: fixed per layer).
    redraw: bool = False

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: LSH chunks of L/8 up to L=128; from 256 the default 64."""
        return {"chunk_size": seq_len // 8} if seq_len <= 128 else {}


def num_buckets(cfg: ReformerConfig, padded_len: int) -> int:
    """Buckets used at padded length `padded_len` (always even)."""
    if cfg.n_buckets > 0:
        return cfg.n_buckets
    n_chunks = padded_len // cfg.chunk_size
    return n_chunks + n_chunks % 2


def unit_keys(q_BxLxHxD: jax.Array) -> jax.Array:
    """Shared-QK keys: queries scaled to unit L2 length."""
    sq_norm_BxLxHx1 = jnp.sum(q_BxLxHxD * q_BxLxHxD, axis=-1, keepdims=True)
    return q_BxLxHxD * jax.lax.rsqrt(sq_norm_BxLxHx1 + 1e-12)


@register
class ReformerAttention(Attention):
    config_cls = ReformerConfig
    check_settings = {'chunk_size': 16, 'n_hashes': 2}  # lra.check: small-but-real
    prob_dropout = True
    shared_qk = True
    exact_pattern = True

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        padded_max = -(-self.max_len // cfg.chunk_size) * cfg.chunk_size
        half = num_buckets(cfg, padded_max) // 2
        # One rotation per head and round; columns beyond n_buckets/2 serve longer inputs.
        # Drawn with numpy from a seed taken from rngs.params(): every layer gets its own.
        seed = np.asarray(jax.random.key_data(rngs.params())).astype(np.uint32).ravel()
        rotations = np.random.default_rng(seed).standard_normal(
            (self.num_heads, cfg.n_hashes, self.head_dim, half))
        self.rotations = Buffer(jnp.asarray(rotations, jnp.float32))

    @classmethod
    def check_seq_len(cls, cfg: ReformerConfig, seq_len: int) -> None:
        if cfg.chunk_size < 1 or cfg.n_hashes < 1:
            raise ValueError(f"reformer needs model.attention.chunk_size >= 1 and n_hashes >= 1 "
                             f"(got {cfg.chunk_size}, {cfg.n_hashes}); set them to e.g. 64 and 2")
        if cfg.n_buckets < 0 or cfg.n_buckets % 2:
            raise ValueError(f"reformer needs an even model.attention.n_buckets (got "
                             f"{cfg.n_buckets}); use 0 for automatic or an even number")
        if seq_len <= cfg.chunk_size:
            raise ValueError(f"reformer needs seq_len > model.attention.chunk_size="
                             f"{cfg.chunk_size} (>= 2 chunks; got {seq_len}); lower "
                             "model.attention.chunk_size or raise task.seq_len")

    def _rotations(self, n_buckets: int, rng: jax.Array | None) -> jax.Array:
        """Random rotations [H, R, D, n_buckets/2]: the fixed buffer, or redrawn from rng."""
        stored_HxRxDxK = self.rotations[...]
        if self.cfg.redraw and rng is not None:
            return jax.random.normal(rng, (*stored_HxRxDxK.shape[:3], n_buckets // 2))
        if n_buckets // 2 > stored_HxRxDxK.shape[-1]:
            raise ValueError(f"reformer: model.attention.n_buckets={n_buckets} exceeds the "
                             "rotations drawn at init; build the module with this config")
        return stored_HxRxDxK[..., : n_buckets // 2]

    def _sort_order(self, q_BxPxHxD: jax.Array, mask_BxP: jax.Array, rng: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array]:
        """Per round: token at each sorted slot (perm) and slot of each token (inverse)."""
        padded_len = q_BxPxHxD.shape[1]
        n_buckets = num_buckets(self.cfg, padded_len)
        rot_HxRxDxK = self._rotations(n_buckets, rng)
        keys_BxPxHxD = jax.lax.stop_gradient(unit_keys(q_BxPxHxD))
        rotated_BxHxRxPxK = jnp.einsum("bphd,hrdk->bhrpk", keys_BxPxHxD, rot_HxRxDxK)
        buckets_BxHxRxP = jnp.argmax(
            jnp.concatenate([rotated_BxHxRxPxK, -rotated_BxHxRxPxK], axis=-1), axis=-1)
        # Padding goes to an extra last bucket: real tokens fill the first sorted slots.
        buckets_BxHxRxP = jnp.where(mask_BxP[:, None, None, :], buckets_BxHxRxP, n_buckets)
        position_P = jnp.arange(padded_len)
        sort_key_BxHxRxP = buckets_BxHxRxP * padded_len + position_P  # unique: (bucket, pos)
        perm_BxHxRxP = jnp.argsort(sort_key_BxHxRxP, axis=-1)
        slot_BxHxRxP = jnp.argsort(perm_BxHxRxP, axis=-1)
        return perm_BxHxRxP, slot_BxHxRxP

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """LSH attention; `k` is ignored (shared-QK: keys are the normalised queries)."""
        del k_BxLxHxD
        b, length, h, d = q_BxLxHxD.shape
        c, n_rounds = self.cfg.chunk_size, self.cfg.n_hashes
        mask_BxP, q_BxPxHxD, v_BxPxHxD = pad_to_blocks(c, mask_BxL, q_BxLxHxD, v_BxLxHxD)
        padded_len = q_BxPxHxD.shape[1]
        n = padded_len // c

        perm_BxHxRxP, slot_BxHxRxP = self._sort_order(q_BxPxHxD, mask_BxP, rng)
        perm_BxHxRxPx1 = perm_BxHxRxP[..., None]
        q_BxHx1xPxD = jnp.transpose(q_BxPxHxD, (0, 2, 1, 3))[:, :, None]
        v_BxHx1xPxD = jnp.transpose(v_BxPxHxD, (0, 2, 1, 3))[:, :, None]
        sq_BxHxRxNxSxD = jnp.take_along_axis(q_BxHx1xPxD, perm_BxHxRxPx1, axis=3).reshape(
            b, h, n_rounds, n, c, d)
        sv_BxHxRxNxSxD = jnp.take_along_axis(v_BxHx1xPxD, perm_BxHxRxPx1, axis=3).reshape(
            b, h, n_rounds, n, c, d)
        sk_BxHxRxNxSxD = unit_keys(sq_BxHxRxNxSxD)

        def with_previous(x_BxHxRxNxSx: jax.Array) -> jax.Array:
            """Each chunk's keys followed by the previous chunk's (chunk 0 wraps to the last)."""
            return jnp.concatenate([x_BxHxRxNxSx, jnp.roll(x_BxHxRxNxSx, 1, axis=3)], axis=4)

        k_BxHxRxNxWxD = with_previous(sk_BxHxRxNxSxD)  # W = 2c keys per query chunk
        v_BxHxRxNxWxD = with_previous(sv_BxHxRxNxSxD)
        qpos_BxHxRxNxS = perm_BxHxRxP.reshape(b, h, n_rounds, n, c)
        kpos_BxHxRxNxW = with_previous(qpos_BxHxRxNxS)
        key_real_BxHxRxNxW = jnp.take_along_axis(
            mask_BxP[:, None, None, :], kpos_BxHxRxNxW.reshape(b, h, n_rounds, -1), axis=3
        ).reshape(kpos_BxHxRxNxW.shape)

        scores_BxHxRxNxSxW = jnp.einsum("bhrnid,bhrnjd->bhrnij",
                                        sq_BxHxRxNxSxD * d ** -0.5, k_BxHxRxNxWxD)
        is_self_BxHxRxNxSxW = qpos_BxHxRxNxS[..., :, None] == kpos_BxHxRxNxW[..., None, :]
        scores_BxHxRxNxSxW = jnp.where(is_self_BxHxRxNxSxW, SELF_SCORE, scores_BxHxRxNxSxW)
        scores_BxHxRxNxSxW = jnp.where(key_real_BxHxRxNxW[..., None, :], scores_BxHxRxNxSxW,
                                       NEG_INF)
        if n_rounds > 1:
            scores_BxHxRxNxSxW = scores_BxHxRxNxSxW - jnp.log(
                self._duplicate_counts(slot_BxHxRxP, qpos_BxHxRxNxS, kpos_BxHxRxNxW))

        # One softmax per round's chunk (`softmax_pieces_lse`: one piece, hand-written VJP); its
        # log-partition weights the rounds. Dropout acts on the numerator only (lse undropped).
        out_BxHxRxNxSxD, lse_BxHxRxNxSx1 = softmax_pieces_lse(
            [scores_BxHxRxNxSxW], [("bhrnij,bhrnjd->bhrnid", v_BxHxRxNxWxD)], self.drop(rng))
        out_BxHxRxPxD = out_BxHxRxNxSxD.reshape(b, h, n_rounds, padded_len, d)
        lse_BxHxRxNxS = lse_BxHxRxNxSx1[..., 0]

        # Unsort each round back to token order, then weight rounds by their partition sums.
        out_BxHxRxPxD = jnp.take_along_axis(out_BxHxRxPxD, slot_BxHxRxP[..., None], axis=3)
        lse_BxHxRxP = jnp.take_along_axis(lse_BxHxRxNxS.reshape(b, h, n_rounds, padded_len),
                                          slot_BxHxRxP, axis=3)
        weights_BxHxRxP = jax.nn.softmax(lse_BxHxRxP, axis=2)
        out_BxHxPxD = jnp.einsum("bhrp,bhrpd->bhpd", weights_BxHxRxP, out_BxHxRxPxD)
        return jnp.transpose(out_BxHxPxD, (0, 2, 1, 3))[:, :length]

    def _duplicate_counts(self, slot_BxHxRxP: jax.Array, qpos_BxHxRxNxS: jax.Array,
                          kpos_BxHxRxNxW: jax.Array) -> jax.Array:
        """c_ij: in how many rounds key j is in query i's two chunks (>= 1 by construction)."""
        b, h, n_rounds, n, c = qpos_BxHxRxNxS.shape
        chunk_BxHxPxR = jnp.transpose(slot_BxHxRxP // c, (0, 1, 3, 2))[:, :, None]

        def chunks_in_all_rounds(pos_BxHxRxNx: jax.Array) -> jax.Array:
            flat_BxHxRx = pos_BxHxRxNx.reshape(b, h, n_rounds, -1)[..., None]
            return jnp.take_along_axis(chunk_BxHxPxR, flat_BxHxRx, axis=3).reshape(
                *pos_BxHxRxNx.shape, n_rounds)

        qchunk_BxHxRxNxSx1xR = chunks_in_all_rounds(qpos_BxHxRxNxS)[..., :, None, :]
        qprev_BxHxRxNxSx1xR = (qchunk_BxHxRxNxSx1xR + (n - 1)) % n  # small: mod before broadcast
        kchunk_BxHxRxNx1xWxR = chunks_in_all_rounds(kpos_BxHxRxNxW)[..., None, :, :]
        # Key in the query's own chunk or the one before it (wrapping) in round r'.
        seen_BxHxRxNxSxWxR = ((kchunk_BxHxRxNx1xWxR == qchunk_BxHxRxNxSx1xR)
                              | (kchunk_BxHxRxNx1xWxR == qprev_BxHxRxNxSx1xR))
        return jnp.sum(seen_BxHxRxNxSxWxR, axis=-1, dtype=jnp.float32)

    def reference_keys(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array) -> jax.Array:
        """Test-only: the keys the pattern scores against (normalised queries)."""
        return unit_keys(q_BxLxHxD)

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only O(L^2): union over rounds of same-or-previous sorted chunk, self rule."""
        length = q_BxLxHxD.shape[1]
        c = self.cfg.chunk_size
        mask_BxP, q_BxPxHxD = pad_to_blocks(c, mask_BxL, q_BxLxHxD)
        n = q_BxPxHxD.shape[1] // c
        _, slot_BxHxRxP = self._sort_order(q_BxPxHxD, mask_BxP, None)
        chunk_BxHxRxL = (slot_BxHxRxP // c)[..., :length]
        lag_BxHxRxLxL = (chunk_BxHxRxL[..., :, None] - chunk_BxHxRxL[..., None, :]) % n
        seen_BxHxLxL = jnp.any(lag_BxHxRxLxL <= 1, axis=2) & mask_BxL[:, None, None, :]
        eye_LxL = jnp.eye(length, dtype=bool)
        others_BxHxLxL = seen_BxHxLxL & ~eye_LxL
        has_other_BxHxLx1 = jnp.any(others_BxHxLxL, axis=-1, keepdims=True)
        return others_BxHxLxL | (seen_BxHxLxL & eye_LxL & ~has_other_BxHxLx1)
