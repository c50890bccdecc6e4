"""Each config key's role is declared once (lra.config.ROLES); the checkpoint fingerprint, the
report's labels and the run-dir tag all follow it."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import compose
from lra import cli
from lra.train import checkpoint
from lra.config import ROLE_USES, ROLES, role
from lra.results import RunResult, load_results, write_result


def _other(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, 7]
    return f"{value}x" if value is not None else "elsewhere"


def _set(config: dict, key: str, value) -> dict:
    out = copy.deepcopy(config)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _keys() -> list[str]:
    """Every key ROLES names (a prefix: its sections' first leaf) and some identity keys."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose("model=transformer", "task=listops"), resolve=True)
    leaves = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                leaves.append(f"{prefix}{key}")

    walk(config, "")
    named = [k for k in ROLES if not k.endswith(".")]
    named += [next(leaf for leaf in leaves if leaf.startswith(p)) for p in ROLES if p.endswith(".")]
    return named + ["train.lr", "train.steps", "model.emb_dim", "model.attention.dropout",
                    "task.num_train"]


@pytest.fixture(scope="module")
def base() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose("model=transformer", "task=listops", "preset=tiny"),
                                  resolve=True)


def test_every_role_is_known_and_prefixes_match_sections():
    assert set(ROLES.values()) <= set(ROLE_USES)
    assert role("train.steps") == "identity" and role("eval.seq_lens") == "context"
    assert role("train.lr") == role("train.weight_decay") == "tuned"  # lra.suite's lr= / wd= grid
    assert role("dist.num_processes") == "bookkeeping" and role("distx") == "identity"


@pytest.mark.parametrize("key", _keys())
def test_fingerprint_and_tag_follow_the_role(base, key):
    uses = ROLE_USES[role(key)]
    changed = _set(base, key, _other(_get(base, key)))
    moved = checkpoint.fingerprint(changed) != checkpoint.fingerprint(base)
    assert moved == ("fingerprint" in uses), (key, role(key))
    value = json.dumps(_get(changed, key)) if isinstance(_get(changed, key), list) else _get(changed, key)
    tagged = cli.tag([f"{key}={value}"]) != "default"
    assert tagged == ("tag" in uses), (key, role(key))


@pytest.mark.parametrize("key", ["train.lr", "train.max_time_s", "train.log_every", "seed",
                                 "task.data_dir", "eval.seq_lens", "point_timeout_s"])
def test_report_labels_follow_the_role(tmp_path, base, key):
    for n, config in enumerate([base, _set(base, key, _other(_get(base, key)))]):
        row = RunResult(task="listops", model="transformer", seq_len=512, seed=config["seed"],
                        preset="tiny", config=config)
        write_result(row, tmp_path / str(n))
    # task.* keys label the task column (label_tasks), the others the model's label
    frame = load_results(tmp_path, verbose=False)
    labels = set(frame["task" if key.startswith("task.") else "model"])
    labelled = "label" in ROLE_USES[role(key)]
    assert (len(labels) == 2) == labelled, (key, labels)
    if labelled:
        assert any(key.rsplit(".", 1)[-1] + "=" in m for m in labels)


def test_the_tag_matches_hydras_override_dirname_for_kept_keys():
    # Run directories written before the roles table keep their names: the tag is the hash of
    # Hydra's job.override_dirname form (sorted key=value joined by ",") of the kept overrides.
    import hashlib

    expected = hashlib.sha1(b"model.emb_dim=16,train.lr=0.01").hexdigest()[:8]
    assert cli.tag(["train.lr=0.01", "train.progress=false", "model.emb_dim=16", "seed=3",
                    "model=bigbird"]) == expected
    assert cli.tag(["seed=1", "train.checkpoint_every=5"]) == "default"
