"""The wheel: configs ship inside the package, import names are unique to the project."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_configs_and_only_lra_import_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("lra_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lra"}  # no top-level `models` or `tasks` to collide with a user's
    shipped = {n.removeprefix("lra/configs/") for n in names if n.startswith("lra/configs/")}
    in_repo = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == in_repo
    for module in ("lra/models/attention/dense.py", "lra/tasks/listops.py", "lra/check.py"):
        assert module in names
