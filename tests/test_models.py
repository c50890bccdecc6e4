"""Registry-driven model tests: every model config composes, builds, trains a tiny run."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lra import models
from conftest import compose
from lra import cli
from lra.models import attention

MODELS = cli.choices("model")


def test_every_attention_kind_has_a_model_config():
    kinds = {compose(f"model={m}").model.attention.kind for m in MODELS}
    assert kinds == set(attention.REGISTRY)


# Pinned parameter counts at the tiny preset on ListOps (vocab 17, 10 classes, L=512): a change
# here is a change of architecture and must be deliberate.
PARAMS = {
    "transformer": 28298, "flash": 28298, "bigbird": 28298, "local": 28298, "sparse": 28298, "longformer": 28298,
    "reformer": 28298 - 32 * 32 - 32, "linear": 28298, "performer": 28298, "nystrom": 28298 + 70,
    "linformer": 28298 + 2 * 512 * 256, "sinkhorn": 29114,
    "synthesizer": 46250 - (32 * 32 + 32),  # no key projection: its logits never read k
    "fnet": 28298 - 4 * (32 * 32 + 32),
    # Mixers replace the 4 projections (fnet's count) with their own weights; E = 32, 1 layer.
    # lstm: 2 directions x (W_x 32x64 + W_h 16x64 + bias 64), hidden 16 each.
    "lstm": 28298 - 4 * (32 * 32 + 32) + 2 * (32 * 64 + 16 * 64 + 64),
    # s4d: N/2 = 32; log_dt 32 + A re, im 2x32x32 + C 2 dirs x32x32 x (re, im) + D 32 + Linear 32x32+32.
    "s4d": 28298 - 4 * (32 * 32 + 32) + 32 + 2 * 32 * 32 + 2 * 32 * 32 * 2 + 32 + 32 * 32 + 32,
    # lru: N = 128; nu, theta, gamma 3x128 + B 128x32 x (re, im) + C 2 dirs x32x128 x (re, im) + D 32.
    "lru": 28298 - 4 * (32 * 32 + 32) + 3 * 128 + 128 * 32 * 2 + 2 * 32 * 128 * 2 + 32,
    # transformer_xl: + per layer (1 at tiny) W_R 32x32 without bias + u, v of H x D = 2 x 16 each.
    "transformer_xl": 28298 + 32 * 32 + 2 * 2 * 16,
    # h_transformer: no parameters of its own; adaptive_span: one span per head (H = 2).
    "h_transformer": 28298, "adaptive_span": 28298 + 2,
    # hyena (E = 32, filter FFN K = 64, 5 positional features, 2 filters x 2 directions): in 32x96+96,
    # short conv 3x96+96, FFN 5x64+64 + 2 x (64x64+64) + 64x(2x2x32), sine freq 64, skip d 2x32, out 32x32+32.
    "hyena": 28298 - 4 * (32 * 32 + 32) + (32 * 96 + 96) + (3 * 96 + 96) + (5 * 64 + 64)
             + 2 * (64 * 64 + 64) + 64 * 2 * 2 * 32 + 64 + 2 * 32 + (32 * 32 + 32),
    # mamba (K = 2E = 64, N = 16, dt rank 2, 4 taps, 2 directions): in 32x128, out 64x32 (no biases),
    # per direction A_log, B, C KxN each, conv 4xK + K, D, dt bias K each, dt in Kx2 + out 2xK.
    "mamba": 28298 - 4 * (32 * 32 + 32) + 32 * 128 + 64 * 32
             + 2 * (3 * 64 * 16 + 4 * 64 + 64 + 64 + 64 + 64 * 2 + 2 * 64),
    # retnet: + the swish gate's W_G (32x32, no bias); gla: + its biased gate and the rank-16
    # decay gate (32x16, 16x32 + 32).
    "retnet": 28298 + 32 * 32,
    "gla": 28298 + (32 * 32 + 32) + 32 * 16 + (16 * 32 + 32),
    # deltanet: per direction a 4-tap depthwise conv (no bias) on q, k and v (4 x 3E), beta's
    # E x H (read from v); gated_deltanet: + alpha's E x H, A_log and dt_bias per head, output gate E x E.
    "deltanet": 28298 + 2 * 4 * 3 * 32 + 32 * 2,
    "gated_deltanet": 28298 + 2 * 4 * 3 * 32 + 2 * 32 * 2 + 2 * 2 + 32 * 32,
    # mamba2 (K = 2E = 64, one head of P = 64, N = 64, 4 taps, 2 directions C): in E x (2K + 2N + CH),
    # per direction conv (W + 1)(K + 2N), A_log, dt_bias, D per head; norm scale K; out K x E.
    "mamba2": 28298 - 4 * (32 * 32 + 32) + 32 * (2 * 64 + 2 * 64 + 2) + 2 * 5 * (64 + 128)
              + 3 * 2 + 64 + 64 * 32,
    # mlstm: + per direction-shared gates, input and forget: [q|k|v] (3E) -> H each, with biases;
    # + the swish gate's W_G (E x E, no bias).
    "mlstm": 28298 + 2 * (3 * 32 * 2 + 2) + 32 * 32,
    # hawk (K = 44, H = 2 heads of J = 22, 4 taps, 2 directions): in E x 2K + 2K, out K x E + E,
    # per direction conv 4K + K, block-diagonal gates a and x 2 (H J^2 + K), Lambda K.
    "hawk": 28298 - 4 * (32 * 32 + 32) + (2 * 32 * 44 + 2 * 44) + (44 * 32 + 32)
            + 2 * (4 * 44 + 44 + 2 * (2 * 22 * 22 + 44) + 44),
    # rwkv7 (E = 32, H = 2, LoRA ranks 8): token-shift mixes 6E, W_r, W_k, W_v, W_o 4 x E x E (no
    # biases), LoRAs w and a 2 x (E x 8 + 8 x E + E), g E x 8 + 8 x E, xi, alpha E, rho H x D,
    # GroupNorm 2E.
    "rwkv7": 28298 - 4 * (32 * 32 + 32) + 6 * 32 + 4 * 32 * 32 + 2 * (2 * 32 * 8 + 32)
             + 2 * 32 * 8 + 2 * 32 + 32 + 2 * 32,
    # based (E = 32, H = 2, feature dim F = 16, 3 taps, 2 directions): [W_q|W_k|W_v] E x (2HF + E)
    # and W_out E x E, no biases; per direction a conv of 3 x (2HF + E).
    "based": 28298 - 4 * (32 * 32 + 32) + 32 * (2 * 2 * 16 + 32) + 32 * 32 + 2 * 3 * (2 * 2 * 16 + 32),
    # mh_hyena (E = 32, H = 2, K = 2 filter width, 3 positional features, 4 tied projection groups,
    # 2 directions C): in E x 3E/4 + 3E/4, short conv 3 x 3E + 3E, FFN 3K + K + 2(K^2 + K) + K C H
    # + sine freq K, skip d per head H, out E x E + E.
    "mh_hyena": 28298 - 4 * (32 * 32 + 32) + (32 * 24 + 24) + (3 * 96 + 96)
                + (3 * 2 + 2 + 2 * (4 + 2) + 2 * 2 * 2 + 2) + 2 + (32 * 32 + 32),
    # nsa (D = 16, compression MLP width K = D, blocks of l = 32): per keys and values
    # W1 l x D x K + b1 H x K + W2 K x D + b2 D; gates q (E) -> 3H with bias. Reads the encoder's
    # q, k, v and keeps its W_O and position table.
    "nsa": 28298 + 2 * (32 * 16 * 16 + 2 * 16 + 16 * 16 + 16) + 3 * 2 * (32 + 1),
}
# Models whose papers add no absolute positions default to pos=none (retnet: rope): no 512 x 32 position table,
# and their param_ratio compares with the Transformer without one too.
POS_TABLE = 512 * 32
NO_POS = ("lstm", "s4d", "lru", "transformer_xl", "hyena", "mamba", "retnet", "gla", "mamba2",
          "mlstm", "hawk", "deltanet", "gated_deltanet", "rwkv7", "based", "mh_hyena")  # (retnet: rope)
for _name in NO_POS:
    PARAMS[_name] -= POS_TABLE


@pytest.mark.parametrize("model", MODELS)
def test_param_count_is_pinned(model):
    from lra import tasks

    cfg = compose(f"model={model}", "task=listops", "preset=tiny")
    spec = tasks.build(OmegaConf.to_object(cfg.task)).spec
    model_cfg = OmegaConf.to_object(cfg.model)
    built = models.build(model_cfg, spec)
    count = models.param_count(built)
    expected = PARAMS[model]
    assert count == expected
    # result.json's param_ratio: against the Transformer with the same dims (LRA's budget rule).
    baseline = PARAMS["transformer"] - (POS_TABLE if model in NO_POS else 0)
    assert models.param_ratio(built, model_cfg, spec) == pytest.approx(expected / baseline)


def test_build_refuses_a_length_the_attention_cannot_serve():
    """models.build reaches the variant's one check (Attention.__init__): same one-line error."""
    from lra.models.attention.bigbird import BigBirdAttention, BigBirdConfig
    from lra.models.config import ModelConfig

    attn_cfg = BigBirdConfig(block_size=16, num_rand_blocks=2)
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=96, kind="classify",
                                 default_pool="mean"))()
    with pytest.raises(ValueError) as expected:
        BigBirdAttention.check_seq_len(attn_cfg, 96)
    with pytest.raises(ValueError) as err:
        models.build(ModelConfig(emb_dim=16, num_heads=2, attention=attn_cfg), spec)
    assert str(err.value) == str(expected.value) and "task.seq_len" in str(err.value)


@pytest.mark.parametrize("model", MODELS)
def test_tiny_listops_run_is_ok(model, tmp_path):
    from lra.run import execute

    cfg = compose(f"model={model}", "task=listops", "preset=tiny", "train.progress=false")
    result = execute(cfg, tmp_path)
    assert result.status == "ok", result.error
    assert result.steps == cfg.train.steps and 0.0 <= result.test_accuracy <= 1.0
    assert result.train_loss is not None and result.steps_per_s > 0
