"""Registry-driven model tests: every model config composes, builds, trains a tiny run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lra import models
from conftest import compose
from lra import cli
from lra.models import attention

MODELS = cli.choices("model")


def test_every_attention_kind_has_a_model_config():
    kinds = {compose(f"model={m}").model.attention.kind for m in MODELS}
    assert kinds == set(attention.REGISTRY)


def test_every_model_pins_its_tiny_param_count_in_its_own_test_file():
    """conftest.assert_tiny_params("<model>", count) once per model, in the model's own test file:
    a new model adds its pin beside its other tests, and no list here is edited."""
    tests = Path(__file__).parent
    pinned = [m for path in sorted(tests.glob("test_*.py"))
              for m in re.findall(r'assert_tiny_params\("(\w+)"', path.read_text())]
    assert sorted(pinned) == sorted(MODELS)


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
