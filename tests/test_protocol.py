"""`protocol=lra`: one override switches every model to LRA's code settings; paper stays default."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lra import models
from conftest import compose, run_cli
from lra import cli

MODELS = cli.choices("model")
SPEC = type("Spec", (), dict(vocab_size=20, num_classes=10, seq_len=512, kind="classify",
                             default_pool="cls"))()


def model_cfg(*overrides):
    cfg = compose(*overrides)
    return cfg, OmegaConf.to_object(cfg.model)


def test_every_model_has_lra_settings():
    # A new model yaml must say what LRA's code did (or that LRA never ran it).
    files = {p.stem for p in (cli.CONFIG_DIR / "protocol_model" / "lra").glob("*.yaml")}
    assert files == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_protocol_lra_composes_and_builds_every_model(model):
    paper_cfg, paper = model_cfg(f"model={model}", "preset=tiny")
    cfg, lra = model_cfg(f"model={model}", "preset=tiny", "protocol=lra")
    assert paper_cfg.protocol.name == "paper" and cfg.protocol.name == "lra"
    # LRA's shared encoder: fixed sinusoidal positions on listops, for every model.
    assert lra.pos == "sinusoidal"
    cls = models.attention.get(lra.attention.kind)
    assert lra.attention.dropout == (0.1 if cls.prob_dropout and model not in
                                     ("bigbird", "reformer") else 0.0)
    assert paper.attention.dropout == 0.0
    # The resolved model builds (its checks pass: dropout, pattern, positions).
    models.build(lra, SPEC)


@pytest.mark.parametrize("model, field, paper, lra", [
    ("local", "num_neighbours", 1, 0),
    ("longformer", "window", 256, 512),
    ("longformer", "num_global", 1, 0),
    ("linformer", "k", 256, 16),
    ("linformer", "share_kv", False, True),
    ("performer", "kernel", "softmax", "relu"),
    ("sinkhorn", "sort", "sinkhorn", "softmax"),
    ("reformer", "n_hashes", 2, 1),
    ("sparse", "causal", False, True),
    ("sparse", "global_first", False, True),
    ("sparse", "block_size", 0, 50),
    ("synthesizer", "mode", "dense", "random"),
    ("synthesizer", "plus_dot", False, True),
])
def test_lra_departures_from_the_papers(model, field, paper, lra):
    assert getattr(model_cfg(f"model={model}")[1].attention, field) == paper
    assert getattr(model_cfg(f"model={model}", "protocol=lra")[1].attention, field) == lra


def test_image_task_uses_cifar10_settings_and_user_overrides_win():
    _, image = model_cfg("model=transformer", "task=image", "protocol=lra")
    assert (image.pos, image.attention.dropout) == ("learned", 0.2)
    _, mine = model_cfg("model=transformer", "protocol=lra", "model.attention.dropout=0.3",
                        "model.pos=rope")
    assert (mine.pos, mine.attention.dropout) == ("rope", 0.3)


def test_papers_positions_are_the_default_for_recurrent_models():
    for model in ("transformer_xl", "s4d", "lru", "lstm"):
        assert model_cfg(f"model={model}")[1].pos == "none"
    assert model_cfg("model=transformer")[1].pos == "learned"


def test_unknown_protocol_is_a_one_line_error():
    proc = run_cli("lra.run", "protocol=lraa")
    assert proc.returncode != 0
    assert "error: unknown protocol 'lraa'; known: lra, paper" in proc.stderr


def test_acceptance_performer_listops_tiny_protocol_lra(tmp_path):
    # The acceptance command, as a user runs it (results/ under the working directory).
    proc = run_cli("lra.run", "model=performer", "task=listops", "preset=tiny", "protocol=lra",
                   "train.progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # protocol=lra runs get their own directory; protocol=paper keeps the default one.
    run_dir = tmp_path / "results" / "listops" / "performer" / "L512-tiny-lra-s0-default"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok"
    config = result["config"]
    assert config["protocol"]["name"] == "lra"
    assert config["model"]["attention"]["kernel"] == "relu"
    assert config["model"]["pos"] == "sinusoidal"  # interpolations resolved in the record
