"""User modules that register attention variants or tasks, imported in every harness process.

A plugin is any importable module whose import runs `@register` (models.attention) or
`@register_task` (tasks). It is named on the command line, `plugins=[pkg.module,...]`, or by an
installed package in the `lra_bench.plugins` entry-point group. The harness imports plugins
before it registers config schemas (so `model=<kind>` works with no YAML) and again in every
process it starts: sweep points and bench workers read `plugins` from the config they are given
(lra.config.from_container), launcher jobs from the composed config.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "lra_bench.plugins"
_loaded: set[str] = set()


class PluginError(ImportError):
    """A plugin could not be imported; the message is one line naming the fix."""


def load(modules: Iterable[str]) -> list[str]:
    """Import each module once (and the entry-point group's, once per process); returns the
    module names imported now."""
    new = []
    for name in [*_entry_points(), *modules]:
        name = str(name).strip()
        if not name or name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure of a user module is reported
            raise PluginError(
                f"plugins: cannot import {name!r} ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]}); put its directory on PYTHONPATH or "
                f"`pip install` its package") from err
        _loaded.add(name)
        new.append(name)
    return new


def _entry_points() -> list[str]:
    if "entry_points" in _loaded:
        return []
    _loaded.add("entry_points")
    return [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]


def from_argv(argv: list[str]) -> list[str]:
    """Module names in a `plugins=[a,b]` / `plugins=a` command-line override."""
    names: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "plugins":
            names += [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]
    return names


def load_from_argv(argv: list[str] | None = None) -> None:
    """At start-up: the command line's plugins; a failure is a one-line error, exit 2."""
    try:
        load(from_argv(sys.argv[1:] if argv is None else argv))
    except PluginError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
