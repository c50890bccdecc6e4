"""`--help` (lra.help via hydra.help.template): the harness's own groups and keys with the
command line's values, no Hydra schema internals, and every key it names is a real key."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from lra import cli


def keys_named(text: str) -> dict[str, str]:
    """`key=value` of the help's key section (its rows start with two spaces and a key)."""
    section = text.partition("== Keys")[2]
    return dict(m.groups() for m in re.finditer(r"^  ([\w./]+)=(\S*)", section, re.MULTILINE))


def test_run_help_lists_the_groups_and_this_command_lines_values():
    proc = run_cli("lra.run", "model=s4d", "train.steps=7", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "schema/" not in text  # Hydra's own list would show schema/model, schema/task
    internal = r"^(task_preset|protocol_task|protocol_model|patterns_model)"
    assert not re.search(internal, text, re.MULTILINE)
    for group in ("model", "task", "preset", "protocol"):
        assert re.search(rf"^{group}=", text, re.MULTILINE), group
    listed = set(re.findall(r"^  [* ] (\w+) ", text.partition("== Keys")[0], re.MULTILINE))
    for group in ("model", "task", "preset"):  # every config file of the group is a choice
        assert {p.stem for p in (ROOT / "configs" / group).glob("*.yaml")} <= listed, group
    for chosen in ("s4d", "small", "listops"):
        assert re.search(rf"^  \* {chosen} ", text, re.MULTILINE), chosen
    keys = keys_named(text)
    assert keys["train.steps"] == "7" and keys["model.attention.state_dim"] == "64"
    assert "model.attention.kind" not in keys  # the model's, not a setting
    assert {"skip_done", "fresh_process", "point_timeout_s", "hydra.sweep.dir"} <= set(keys)


@pytest.mark.parametrize("config_name,overrides", [
    ("config", ["model=bigbird", "task=copy"]),
    ("bench", ["model=performer", "hydra/launcher=joblib"]),
])
def test_every_key_the_help_names_is_in_the_composed_config(config_name, overrides):
    cli.setup()
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    text = cfg.hydra.help.template.replace("$$", "$")  # as Hydra's string.Template leaves it
    keys = keys_named(text)
    assert len(keys) >= 15
    if config_name == "bench":
        assert "bench.point_timeout_s" in keys and "hydra/launcher" in keys
    for key, shown in keys.items():
        if "/" in key:  # a Hydra group: its choice
            assert cfg.hydra.runtime.choices[key] == shown, key
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        assert OmegaConf.is_dict(node) and leaf in node, f"--help names {key}, not a config key"
    assert keys["hydra/launcher"] == ("joblib" if config_name == "bench" else "pool")
