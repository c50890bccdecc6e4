"""Hybrid stacks (model.layers, model.mixers; models/config.py layer_configs): the pattern
repeats over the layers, each kind with its own config, the parameters are the layers' own, the
row is named after the stack, and bad input is one line at start-up."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose
from lra import cli, models, tasks
from lra.models.config import ModelConfig, display_name, layer_configs
from lra.models.attention.dense import DenseConfig
from lra.models.attention.local import LocalConfig


def built(*overrides):
    cfg = compose("task=listops", "preset=tiny", *overrides)
    model_cfg = OmegaConf.to_object(cfg.model)
    spec = tasks.build(OmegaConf.to_object(cfg.task)).spec
    return models.build(model_cfg, spec), model_cfg, spec


def test_the_pattern_repeats_and_each_kind_keeps_its_own_config():
    cfg = ModelConfig(attention=DenseConfig(), num_layers=5, layers=["dense", "dense", "local"],
                      mixers={"local": {"block_size": 16}})
    per_layer = layer_configs(cfg)
    assert [c.kind for c in per_layer] == ["dense", "dense", "local", "dense", "dense"]
    assert per_layer[0] is cfg.attention  # attention's own kind takes model.attention
    assert per_layer[2] == dataclasses.replace(LocalConfig(), block_size=16)
    assert layer_configs(dataclasses.replace(cfg, layers=[], mixers={})) == [cfg.attention] * 5


@pytest.mark.parametrize("layers,mixers,message", [
    (["dense", "nope"], {}, "model.layers: unknown attention kind 'nope'"),
    (["dense", "local"], {"local": {"blok": 3}}, "model.mixers.local.blok: local has no such field"),
    (["dense"], {"local": {"block_size": 3}}, "model.mixers.local: local is not in model.layers"),
    ([], {"local": {"block_size": 3}}, "model.mixers configures the kinds of model.layers"),
    (["dense", "dense", "local"], {}, "over model.num_layers=2 never reaches local; set "
                                      "model.num_layers >= 3"),
])
def test_bad_stacks_are_one_line_errors(layers, mixers, message):
    cfg = ModelConfig(attention=DenseConfig(), layers=layers, mixers=mixers)
    with pytest.raises(ValueError) as exc:
        layer_configs(cfg)
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_a_stack_has_each_layers_own_parameters():
    """Two layers [mamba, dense] hold one mamba layer and one dense layer: half of each 2-layer
    model's layer parameters, the embeddings and head once."""
    stack, stack_cfg, spec = built("model=mamba", "model.layers=[mamba,dense]", "model.num_layers=2")
    mamba, _, _ = built("model=mamba", "model.num_layers=2")
    dense, _, _ = built("model=transformer", "model.pos=none", "model.num_layers=2")
    kinds = [type(b.attention.attn).__name__ for b in stack.encoder.blocks]
    assert kinds == ["MambaMixer", "DenseAttention"]
    count = models.param_count
    assert 2 * count(stack) == count(mamba) + count(dense)
    # the ratio follows the stack: against the 2-layer Transformer of the same dims
    assert models.param_ratio(stack, stack_cfg, spec) == pytest.approx(count(stack) / count(dense))


def test_a_stack_runs_and_keeps_padding_out():
    model, _, _ = built("model=retnet", "model.layers=[retnet,local]", "model.num_layers=2",
                        "+model.mixers.local.block_size=16", "model.dropout=0")
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 17, size=(2, 512)).astype(np.int32)
    inputs[1, 300:] = 0
    changed = inputs.copy()
    changed[1, 300:] = 0  # padding stays padding; change a real token of row 0 only
    changed[0, 5] = 1 + inputs[0, 5] % 16
    out = np.asarray(model({"inputs": jax.numpy.asarray(inputs)}))
    out2 = np.asarray(model({"inputs": jax.numpy.asarray(changed)}))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], out2[1], rtol=1e-6, atol=1e-6)  # rows are independent
    assert not np.allclose(out[0], out2[0])


def test_the_row_is_named_after_the_stack():
    assert display_name(ModelConfig(name="hawk", layers=["hawk", "hawk", "local"])) == \
        "hawk+hawk+local"
    assert display_name(ModelConfig(name="transformer", layers=["dense", "mamba"])) == "dense+mamba"
    assert display_name(ModelConfig(name="griffin", layers=["hawk", "hawk", "local"])) == "griffin"
    assert display_name(ModelConfig(name="retnet")) == "retnet"


@pytest.mark.parametrize("argv,message", [
    (["model.layers=[retnet,nope]"], "model.layers: unknown attention kind 'nope'"),
    (["model.layers=[retnet,local]", "+model.mixers.local.blok=1"], "local has no such field"),
    (["+model.mixers.local.block_size=16"], "model.mixers configures the kinds of model.layers"),
])
def test_the_command_line_refuses_a_bad_stack_at_start_up(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.check_overrides(["model=retnet", "task=listops", "preset=tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
