import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated data and compiled executables go to per-session temp dirs, never the user's caches."""
    cache = tmp_path_factory.getbasetemp() / "lra-cache"
    monkeypatch.setenv("LRA_CACHE", str(cache))
    # JAX's persistent compile cache per test session: repeated shapes compile once.
    monkeypatch.setenv("LRA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    return cache


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 300):
    """Run `python -m <module> args` like a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compose(*overrides: str):
    """The resolved Hydra config for `overrides`, as lra.run would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from lra import cli

    cli.setup()
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
