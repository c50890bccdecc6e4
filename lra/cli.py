"""What every entry point shares: config registration, resolvers and one-line input errors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import sys
from pathlib import Path

import jax
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from lra import models, plugins
from lra.config import (CONFIG_DIR, GROUPS, choices, range_errors, register,  # noqa: F401
                        search_dirs, used_for)  # choices, search_dirs: the names callers use
from lra.help import template
from lra.models.config import layer_configs
from lra.results import atomic_write
from lra.sweep import pool
from lra.sweep.launch import unwritable
from lra.train import pretrain
from lra.train.parallel import init_distributed


def tag(overrides) -> str:
    """Short name for the run-dir of a run's command-line overrides: a hash of those whose key
    counts for the tag (lra.config.ROLES; config groups are named in the dir already), written
    as Hydra writes `job.override_dirname` (sorted `key=value`, joined by ","); "default" when
    none is left."""
    kept = sorted(line for line in overrides if _tagged(line.partition("=")[0].lstrip("+~")))
    if not kept:
        return "default"
    return hashlib.sha1(",".join(kept).encode()).hexdigest()[:8]


def _tagged(key: str) -> bool:
    return key not in GROUPS and not key.startswith("hydra") and used_for(key, "tag")


def setup() -> None:
    """Import the command line's (and entry points') plugins, then register the schemas."""
    plugins.load_from_argv()
    register()
    pool.register()  # hydra/launcher=pool
    if not OmegaConf.has_resolver("lra_tag"):
        OmegaConf.register_new_resolver("lra_tag", tag)
    if not OmegaConf.has_resolver("lra_help"):  # hydra.help.template: --help (lra.help)
        OmegaConf.register_new_resolver("lra_help", template)
    if not OmegaConf.has_resolver("lra_protocol_suffix"):  # bench dirs: paper "", lra "-lra"
        OmegaConf.register_new_resolver("lra_protocol_suffix",
                                        lambda name: "" if name == "paper" else f"-{name}")


_DISTRIBUTED = False


def job_setup(cfg) -> None:
    """Inside a Hydra job: the config's plugins (a launcher's job runs in a process of its own),
    multi-host init (once per process), quiet JAX's backend probing, enable the persistent
    compile cache."""
    global _DISTRIBUTED
    plugins.load(cfg.get("plugins") or [])  # a launcher's job process: its own imports
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    if "dist" in cfg and not _DISTRIBUTED:
        init_distributed(cfg.dist.coordinator_address, cfg.dist.num_processes, cfg.dist.process_id)
        _DISTRIBUTED = True
    path = cfg.compile_cache_dir
    if not path or path.lower() in ("off", "none", "false"):
        return
    # compile_time_s then reports the cached compile: the point of the cache.
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def save_job_config(cfg, hydra_cfg, out_dir: Path) -> None:
    """What Hydra's `hydra.output_subdir` would hold, written by the run itself once it holds its
    directory's lock (configs/config.yaml turns Hydra's own copy off: Hydra wrote it before the
    lock, over a running holder's, and on a read-only tree it failed before the run began)."""
    node = out_dir / ".hydra"
    atomic_write(node / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write(node / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write(node / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))


class RunLogHandler(logging.FileHandler):
    """Hydra's job log (<run dir>/run.log) that a full or read-only disk turns off with one line
    on stderr, instead of failing the run before it starts (Hydra's FileHandler) or printing a
    traceback per log record (logging's handleError)."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = False, errors=None):
        self.off = False
        try:
            super().__init__(filename, mode, encoding, delay, errors)
        except OSError as err:
            logging.Handler.__init__(self)
            self.baseFilename, self.mode, self.encoding, self.errors = str(filename), mode, encoding, errors
            self.stream = None
            self._turn_off(err)

    def _turn_off(self, err: OSError) -> None:
        self.off = True
        print(f"warning: {unwritable(self.baseFilename, err, 'the log goes to the console only')}",
              file=sys.stderr)

    def emit(self, record) -> None:
        if not self.off:
            super().emit(record)

    def handleError(self, record) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            return super().handleError(record)
        self._turn_off(err)
        with contextlib.suppress(OSError, ValueError):
            if self.stream is not None:
                self.stream.close()
        self.stream = None


def restore_sigint() -> None:
    """Take Ctrl-C's default back when SIGINT came in ignored: a process a script starts in the
    background (`cmd &` in a non-interactive shell) inherits SIG_IGN, so Python never raises
    KeyboardInterrupt, `kill -INT` does nothing and the suite's stop never reaches its points.
    Every entry point calls this first; its children then start with SIGINT at its default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _check_attention_kind(cfg) -> None:
    """`model.attention.kind` must name a registered variant whose config the model node holds
    (a kind set over another model's fields failed only inside the run)."""
    attention = OmegaConf.select(cfg, "model.attention")
    if attention is None or "kind" not in attention:
        return
    kind = attention.kind
    if kind not in models.attention.REGISTRY:
        fail(f"unknown model.attention.kind {kind!r}; known: "
             f"{', '.join(sorted(models.attention.REGISTRY))}")
    wanted = models.attention.config_class(kind)
    if OmegaConf.get_type(attention) is not wanted:
        fail(f"model.attention.kind={kind} does not match model={cfg.model.name} (its attention "
             f"fields are {OmegaConf.get_type(attention).__name__}'s); use model=<a model with "
             f"that kind> (python -m lra.run --help lists them) instead of changing the kind")
    if cfg.model.get("layers") or cfg.model.get("mixers"):  # a hybrid stack's kinds and fields
        try:
            layer_configs(OmegaConf.to_object(cfg.model))
        except (ValueError, TypeError) as err:
            fail(str(err))


def swept_values(override: str, multirun: bool) -> list[str] | None:
    """The values a multirun sweeps `override` over (Hydra's own grammar: `model=a,b`,
    `range(1,3)`, `x=[1,2],[3]`), or None when it is one value (a list such as
    `bench.seq_lens=[1024,4096]` is one value, not a sweep)."""
    if not multirun:
        return None
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException as err:
        fail(f"bad override: {' '.join(str(err).split())[:300]}")
    return list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else None


def check_bench_out_dir(argv: list[str]) -> None:
    """A multirun bench with one `bench.out_dir` would write every model's and task's points into
    the same L<L>-b<B> directories, each overwriting the last: refuse it at start-up."""
    multirun = "-m" in argv or "--multirun" in argv
    out_dir = [a for a in argv if a.partition("=")[0] == "bench.out_dir" and a.partition("=")[2]]
    swept = [a.partition("=")[0] for a in argv if "=" in a and swept_values(a, multirun)]
    if out_dir and any(key in ("model", "task", "protocol", "preset") or key.startswith("model.")
                       or key.startswith("task.") for key in swept):
        fail(f"{out_dir[0]} puts every point of this sweep over {', '.join(swept)} in one "
             f"directory, each overwriting the last; drop it and set hydra.sweep.dir=DIR instead "
             f"(each point then gets DIR/<task>/<model>)")


def check_overrides(argv: list[str], config_name: str = "config") -> None:
    """Compose the config once up front so bad input dies in one line that names the fix."""
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    # A user's config directories count (their model/task/preset YAMLs are valid choices).
    searchpath = [a for a in argv if a.partition("=")[0] == "hydra.searchpath"]
    multirun = "-m" in argv or "--multirun" in argv
    swept = {o: swept_values(o, multirun) for o in overrides}
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            known = choices(key, searchpath)
            for v in swept[override] or [value]:
                if v not in known:
                    fail(f"unknown {key} {v!r}; known: {', '.join(known)}")
    plain = searchpath + [o for o in overrides if swept[o] is None]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        groups_only = [o for o in plain if o.partition("=")[0] in GROUPS]
        base = compose(config_name=config_name, overrides=searchpath + groups_only)
        for override in plain:
            key = override.partition("=")[0]
            if key in GROUPS or override in searchpath:
                continue
            if key.startswith("+") and key.lstrip("+").startswith("model.mixers."):
                continue  # a stack's per-kind fields: checked against the kind's config below
            if key.startswith("+"):
                # Every node is a fixed schema: "+" can only add a key that does not exist.
                parent, _, leaf = key.lstrip("+").rpartition(".")
                node = OmegaConf.select(base, parent) if parent else base
                valid = ", ".join(sorted(node.keys())) if OmegaConf.is_dict(node) else "-"
                fail(f"{key!r}: configs are fixed schemas, keys cannot be added with '+'; "
                     f"valid keys in {parent or 'the top level'}: {valid}")
            parent, _, leaf = key.lstrip("~").rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            if node is None or not OmegaConf.is_dict(node) or leaf not in node:
                where = parent or "the top level"
                valid = ", ".join(sorted(node.keys())) if OmegaConf.is_dict(node) else "-"
                fail(f"unknown key {key!r} in {where}; valid keys there: {valid}")
        try:
            composed = compose(config_name=config_name, overrides=plain)
        except (ValidationError, ConfigKeyError, Exception) as err:  # noqa: BLE001
            cause = err.__cause__ or err
            fail(f"bad override: {' '.join(str(cause).split())[:300]}")
        _check_attention_kind(composed)
        errors = range_errors(composed) + pretrain.problems(composed)
        # Each value of a swept plain key (train.lr=1e-3,-1) is checked with the rest as given.
        for override in overrides:
            key, _, value = override.partition("=")
            if override in plain or key in GROUPS or key.startswith("+"):
                continue
            for v in swept[override]:
                try:
                    point = compose(config_name=config_name, overrides=plain + [f"{key}={v}"])
                except Exception as err:  # noqa: BLE001
                    cause = err.__cause__ or err
                    fail(f"bad override {key}={v}: {' '.join(str(cause).split())[:300]}")
                _check_attention_kind(point)
                errors += [e for e in range_errors(point) + pretrain.problems(point)
                           if e not in errors]
        if errors:
            fail(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
