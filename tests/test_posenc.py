"""Position encodings (`model.pos`): RoPE's relative property, ALiBi against an explicit bias
matrix for every variant that supports it, the one-line errors, and tiny ListOps runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose, dense_reference, make_attention, masked_softmax, rel_err, run_cli
from lra.check import H, build, inputs, max_two_long_axes
from lra.models import attention
from lra.models.config import ModelConfig
from lra.models.encoder import Encoder, SelfAttentionBlock
from lra.models.posenc import POS_KINDS, AlibiBias, alibi_slopes, check_pos, rope

# From each variant's own flags (models/attention/base.py), not a hand-kept list: every kind
# that says it takes a distance bias is checked below (exact sub-quadratic patterns against an
# explicit bias matrix; adaptive_span's and synthesizer's own tests check theirs).
ALIBI_KINDS = sorted(k for k in attention.REGISTRY
                     if attention.get(k).supports_distance_bias and not attention.get(k).mixer)
BLOCKED_ALIBI_KINDS = [k for k in ALIBI_KINDS
                       if attention.get(k).exact_pattern and not attention.get(k).quadratic]
NO_ROPE_KINDS = sorted(k for k in attention.REGISTRY  # synthesizer: its logits are not q.k
                       if not attention.get(k).mixer and not attention.get(k).supports_rope)


def explicit_bias(slopes_H, length: int) -> np.ndarray:
    """The [H, L, L] ALiBi matrix written out: entry (h, i, j) = -m_h * |i - j|."""
    bias = np.zeros((len(slopes_H), length, length))
    for h, m in enumerate(slopes_H):
        for i in range(length):
            for j in range(length):
                bias[h, i, j] = -m * abs(i - j)
    return bias


def jitted(module, slopes_H):
    """module(q, k, v, mask, bias=ALiBi(slopes_H)) as one compiled function (eager is slower)."""
    graphdef, state = nnx.split(module)
    bias = AlibiBias(tuple(float(m) for m in slopes_H))
    return jax.jit(lambda q, k, v, mask: nnx.merge(graphdef, state)(q, k, v, mask, bias=bias))


# ---------------------------------------------------------------------------------- RoPE


def test_rope_is_the_complex_rotation_of_roformer():
    """Pair (x_2i, x_2i+1) as x_2i + i x_2i+1, times e^{i p theta_i}, theta_i = 10000^(-2i/D)."""
    x = np.random.default_rng(0).standard_normal((2, 50, 3, 8)).astype(np.float32)
    offset = 1000
    got = np.asarray(rope(jnp.asarray(x), offset=offset))
    theta_F = 10000.0 ** (-2.0 * np.arange(4) / 8)
    pos_L = offset + np.arange(50)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos_L[None, :, None, None] * theta_F)
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((1, 64, 2, 16)), jnp.float32) for _ in range(2))

    def scores(offset: int) -> np.ndarray:
        return np.asarray(jnp.einsum("blhd,bmhd->bhlm", rope(q, offset), rope(k, offset)))

    # Same content at shifted absolute positions: identical q.k scores.
    np.testing.assert_allclose(scores(0), scores(777), rtol=1e-4, atol=1e-4)
    # The same q and k vector at every position: scores are constant along diagonals
    # (Toeplitz), i.e. a function of i - j alone; and not constant overall.
    q_const, k_const = (jnp.broadcast_to(x[:, :1], x.shape) for x in (q, k))
    s = np.asarray(jnp.einsum("blhd,bmhd->bhlm", rope(q_const), rope(k_const)))
    np.testing.assert_allclose(s[..., 1:, 1:], s[..., :-1, :-1], rtol=1e-4, atol=1e-4)
    assert np.ptp(s[0, 0, 0]) > 1.0
    # A rotation: norms are kept.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(rope(q, 5)), axis=-1),
                               np.linalg.norm(np.asarray(q), axis=-1), rtol=1e-5)


def block(pos: str, kind: str = "dense", emb_dim: int = 16, num_heads: int = 2, max_len: int = 64,
          **attn_kwargs) -> SelfAttentionBlock:
    attn_cfg = attention.config_class(kind)(**attn_kwargs)
    cfg = ModelConfig(emb_dim=emb_dim, num_heads=num_heads, pos=pos, attention=attn_cfg)
    return SelfAttentionBlock(cfg, max_len, nnx.Rngs(0))


def test_rope_dense_output_invariant_to_a_shift_of_the_content():
    """Content at positions 0..n-1 or s..s+n-1 (the rest masked padding): same real outputs."""
    n, s, e = 40, 24, 16
    rng = np.random.default_rng(2)
    content, noise = rng.standard_normal((1, n, e)), rng.standard_normal((1, s, e)) * 3
    x_first = jnp.asarray(np.concatenate([content, noise], 1), jnp.float32)
    x_shifted = jnp.asarray(np.concatenate([noise, content], 1), jnp.float32)
    real_first = jnp.arange(n + s)[None] < n
    real_shifted = ~(jnp.arange(n + s)[None] < s)
    graphdef, state = nnx.split(block("rope", max_len=n + s))
    roped = jax.jit(lambda x, mask: nnx.merge(graphdef, state)(x, mask, None))
    out_first = np.asarray(roped(x_first, real_first))[0, :n]
    out_shifted = np.asarray(roped(x_shifted, real_shifted))[0, s:]
    np.testing.assert_allclose(out_shifted, out_first, rtol=1e-4, atol=1e-5)
    # RoPE is active: the same weights without it give a different output.
    plain = block("none", max_len=n + s)
    assert rel_err(np.asarray(plain(x_first, real_first, None))[0, :n], out_first) > 1e-2


def test_rope_with_shared_qk_rotates_the_shared_query_once():
    """Reformer (k = q): the block passes rope(q) as both q and k, then projects out."""
    length, e = 64, 16
    module = block("rope", kind="reformer", max_len=length, chunk_size=16, n_hashes=2)
    assert module.key is None
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, length, e)), jnp.float32)
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 9]])
    graphdef, state = nnx.split(module)

    def both(x, mask):
        m = nnx.merge(graphdef, state)
        q_BxLxHxD = rope(m.query(x).reshape(2, length, 2, e // 2))
        v_BxLxHxD = m.value(x).reshape(q_BxLxHxD.shape)
        by_hand = m.out(m.attn(q_BxLxHxD, q_BxLxHxD, v_BxLxHxD, mask).reshape(x.shape))
        return m(x, mask, None), by_hand

    out, by_hand = jax.jit(both)(x, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(by_hand), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("num_heads, want", [
    (8, [2.0 ** -h for h in range(1, 9)]),
    (4, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]),
    # Not a power of two: the 4-head slopes, then every other one of the 8-head slopes.
    (6, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]),
    (12, [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
])
def test_alibi_slopes_are_the_papers(num_heads, want):
    np.testing.assert_allclose(alibi_slopes(num_heads), want, rtol=1e-7)


@pytest.mark.parametrize("impl", ["reference", "explicit", "auto"])
def test_alibi_dense_equals_naive_softmax_with_explicit_bias(impl):
    for num_heads in (4, 3):  # a power of two and not
        length, d = 48, 8
        module = make_attention("dense", length, heads=num_heads, head_dim=d, impl=impl)
        rng = np.random.default_rng(3)
        q, k, v = (jnp.asarray(rng.standard_normal((2, length, num_heads, d)), jnp.float32)
                   for _ in range(3))
        mask = jnp.arange(length)[None] < jnp.array([[length], [length - 13]])
        slopes = alibi_slopes(num_heads)
        out = np.asarray(jitted(module, slopes)(q, k, v, mask))
        allowed = np.broadcast_to(np.asarray(mask)[:, None, None, :],
                                  (2, num_heads, length, length))
        want = dense_reference(q, k, v, allowed, explicit_bias(slopes, length))
        real = np.asarray(mask)
        assert rel_err(out[real], want[real]) <= 1e-5, num_heads
        no_bias = dense_reference(q, k, v, allowed, np.zeros((num_heads, length, length)))
        assert rel_err(no_bias[real], want[real]) > 1e-2  # the bias matters at these slopes


@pytest.mark.parametrize("kind", BLOCKED_ALIBI_KINDS)
def test_alibi_blocked_equals_masked_dense_with_explicit_bias(kind):
    """Same pattern (`reference_mask`), same explicit bias: the blocked bias is positioned right."""
    length = 128
    module = build(kind, length)
    q, k, v, mask = inputs(length)
    allowed_BxHxLxL = np.asarray(jax.jit(module.reference_mask)(q, k, mask))
    real = np.asarray(mask)
    no_bias = dense_reference(q, k, v, allowed_BxHxLxL, np.zeros((H, length, length)))
    for slopes_H in (alibi_slopes(H), np.array([0.5, 0.03], np.float32)):  # paper's, steep
        out = np.asarray(jitted(module, slopes_H)(q, k, v, mask))
        want = dense_reference(q, k, v, allowed_BxHxLxL, explicit_bias(slopes_H, length))
        assert rel_err(out[real], want[real]) <= 1e-5, (kind, slopes_H)
        assert rel_err(no_bias[real], want[real]) > 1e-2  # the bias matters at these slopes


def test_alibi_synthesizer_adds_the_bias_to_its_logits():
    length = 128  # inputs(128) as the blocked tests: its eager ops are compiled once
    module = build("synthesizer", length, mode="dense")
    q, k, v, mask = inputs(length)
    slopes_H = alibi_slopes(module.num_heads)
    out = np.asarray(jitted(module, slopes_H)(q, k, v, mask))
    logits_HxBxLxL = np.asarray(jax.jit(module.synthetic_logits)(q), np.float64)
    logits_BxHxLxL = np.swapaxes(logits_HxBxLxL, 0, 1) + explicit_bias(slopes_H, length)[None]
    allowed = np.broadcast_to(np.asarray(mask)[:, None, None, :], logits_BxHxLxL.shape)
    want = np.einsum("bhlm,bmhd->blhd", masked_softmax(logits_BxHxLxL, allowed),
                     np.asarray(v, np.float64))
    real = np.asarray(mask)
    assert rel_err(out[real], want[real]) <= 1e-5


@pytest.mark.parametrize("kind", BLOCKED_ALIBI_KINDS)
def test_alibi_blocked_builds_no_length_squared_array(kind):
    length = 1024
    module = build(kind, length)
    q, k, v, mask = inputs(length)
    graphdef, state = nnx.split(module)
    bias = AlibiBias.for_heads(module.num_heads)

    def loss(q, k, v):
        return jnp.sum(nnx.merge(graphdef, state)(q, k, v, mask, bias=bias))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    found = max_two_long_axes(jaxpr, length)
    assert found is None, f"{kind} with alibi builds an L x L array of shape {found}"


# -------------------------------------------------------------------------------- errors


def model_config(kind: str, pos: str, emb_dim: int = 16, num_heads: int = 2) -> ModelConfig:
    attn_cfg = attention.config_class(kind)(**attention.get(kind).check_settings)
    return ModelConfig(emb_dim=emb_dim, num_heads=num_heads, num_layers=1, mlp_dim=16, pos=pos,
                       attention=attn_cfg)


def encoder(kind: str, pos: str, **dims) -> Encoder:
    return Encoder(model_config(kind, pos, **dims), vocab_size=8, max_len=128, rngs=nnx.Rngs(0))


def test_the_flagged_lists_cover_the_known_kinds():
    """The derived lists hold the kinds known to take a bias with an exact pattern (a flag lost
    in a refactor would drop a kind from the exact-bias tests below without a failure)."""
    assert {"bigbird", "flash", "local", "longformer", "sparse"} <= set(BLOCKED_ALIBI_KINDS)
    assert {"dense", "adaptive_span", "synthesizer"} <= set(ALIBI_KINDS)


@pytest.mark.parametrize("kind", sorted(attention.REGISTRY))
def test_every_kind_builds_or_fails_in_one_line(kind):
    cls = attention.get(kind)
    for pos in POS_KINDS:
        applies = {"rope": not cls.mixer and kind not in NO_ROPE_KINDS,
                   "alibi": kind in ALIBI_KINDS}.get(pos, True)
        if applies:
            check_pos(model_config(kind, pos))  # what Encoder runs first; builds are costly
            continue
        with pytest.raises(ValueError) as err:
            encoder(kind, pos)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"model.pos={pos} ")
        assert "use model.pos=" in message and kind in message
        if cls.mixer:
            assert "learned, sinusoidal or none" in message
        elif pos == "alibi":
            assert f"kinds that support it: {', '.join(ALIBI_KINDS)};" in message


def test_rope_needs_an_even_head_dim_and_unknown_pos_is_named():
    with pytest.raises(ValueError, match=r"even head dim .*= 3\); change model.emb_dim"):
        encoder("dense", "rope", emb_dim=6, num_heads=2)
    with pytest.raises(ValueError, match="model.pos='xpos'; use learned, sinusoidal, rope, alibi"):
        encoder("dense", "xpos")


def test_cli_reports_the_unsupported_combination_in_one_line(tmp_path):
    proc = run_cli("lra.run", "model=performer", "model.pos=alibi", "task=listops",
                   "preset=tiny", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "model.pos=alibi needs explicit attention scores" in errors[0]
    assert "use model.pos=rope or sinusoidal for performer" in errors[0]


# ------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_tiny_listops_run_is_ok(pos, tmp_path):
    from lra.run import execute

    # Shortened (L=128, 3 steps, one eval batch): the runs are mostly compile time.
    cfg = compose("model=transformer", "task=listops", "preset=tiny", "train.progress=false",
                  f"model.pos={pos}", "task.seq_len=128", "train.steps=3", "train.warmup_steps=1",
                  "train.eval_every=3", "train.eval_batches=1", "train.log_every=1")
    result = execute(cfg, tmp_path)
    assert result.status == "ok", result.error
    assert result.steps == 3 and 0.0 <= result.test_accuracy <= 1.0
    assert np.isfinite(result.train_loss)
    # No learned position table: the tiny transformer's 28298 (at L=512) less 512 * emb_dim.
    assert result.param_count == 28298 - 512 * 32
