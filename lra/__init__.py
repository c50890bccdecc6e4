"""lra-bench: a Long-Range-Arena harness for efficient Transformers in JAX/Flax.

Import names are unique to the project: `lra.models` (the repository's models/) and
`lra.tasks` (tasks/), with the configs at `lra.configs` (configs/). An installed wheel maps those
folders into the package (pyproject.toml); in a source checkout used without installing, the
repository root joins this package's path so the same names resolve to the same folders.
"""

from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "models").is_dir() and (_ROOT / "models" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 - a package's own __path__
