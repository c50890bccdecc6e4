"""Structured configs registered in Hydra's ConfigStore, so typos and unknown names fail early.

Schemas live under the `schema/` group; `configs/model/<name>.yaml` and `configs/task/<name>.yaml`
extend `/schema/model/<kind>` and `/schema/task/<name>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from lra import models, plugins, tasks  # models imports models.attention
from lra.models.config import ModelConfig

# Installed: lra/configs inside the package; a source checkout: configs/ beside lra/.
CONFIG_DIR = next(p for p in (Path(__file__).resolve().parent / "configs",
                              Path(__file__).resolve().parent.parent / "configs") if p.is_dir())


@dataclasses.dataclass
class PretrainConfig:
    """Self-pretraining on the task's own training inputs before training (Amos, Berant & Gupta,
    "Never Train from Scratch", ICLR 2024; lra.train.pretrain): the encoder learns to predict the
    inputs' own tokens for `steps` steps, labels never read, then trains with the task's head for
    the rest of train.steps (the run's whole budget: a run from scratch with the same
    train.steps takes as many steps)."""
    objective: str = "none"        # none | causal (next token) | masked (tokens behind [MASK])
    steps: int = 1000              # the first steps of train.steps; fewer than train.steps
    lr: float = 0.0                # peak learning rate; 0 = train.lr
    mask_rate: float = 0.15        # masked: the fraction of real tokens replaced by [MASK]


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3               # rsqrt: LRA's base rate (peak = lr / sqrt(warmup)); else peak
    schedule: str = "cosine"       # rsqrt (LRA: linear warm-up + rsqrt decay) | cosine | constant
    warmup_steps: int = 200
    weight_decay: float = 0.01
    # Recurrence parameters of SSM / LRU mixers (models.attention.base.SSMParam): their own group
    # with this peak learning rate (the schedule's shape, rescaled) and no weight decay, as in the
    # S4 and LRU papers (S4: 1e-3). Models without such parameters ignore it.
    ssm_lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9
    grad_clip: float = 1.0         # global-norm clip; 0 disables
    eval_every: int = 500          # steps between val evaluations (and at the end)
    # Convergence, per run (result.json `convergence`, lra.train.record.convergence): solved
    # (val accuracy >= solve_at), plateaued (the last `patience` evaluations gained no more than
    # `min_delta` over the best before them) or capped (neither, at train.steps / max_time_s:
    # still improving at its budget). early_stop: end the run once solved or plateaued.
    solve_at: float = 0.99
    patience: int = 3
    min_delta: float = 0.005
    early_stop: bool = False
    eval_batches: int = 0          # 0 = the whole split
    log_every: int = 50            # steps between host fetches of metrics
    max_time_s: float = 0.0        # 0 = no limit; else stop with status timeout
    timing_warmup_steps: int = 2   # steps after compile excluded from throughput
    progress: bool = True
    data_parallel: Optional[bool] = None  # None = on when more than one device is visible
    checkpoint_every: int = 1000   # orbax checkpoint period in steps; 0 = only at the end and on
                                   # SIGINT/SIGTERM; -1 = never
    keep_checkpoints: int = 2      # the last K checkpoints are kept
    resume: bool = True            # an unfinished run dir with a checkpoint resumes from it
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)


@dataclasses.dataclass
class EvalConfig:
    # Length extrapolation: after training, test accuracy at each of these lengths (data made for
    # that length); result.json `eval_lengths`. [] = off.
    seq_lens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DistConfig:
    """Multi-host: every process runs the same command with its own process_id."""
    coordinator_address: Optional[str] = None  # host:port of process 0; None = single process
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass
class BenchConfig:
    seq_lens: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048, 3072, 4096])
    batch_size: int = 2
    steps: int = 20                # timed steady steps per point (median reported)
    warmup_steps: int = 3
    point_timeout_s: float = 900.0
    find_max_len: bool = False     # double L from seq_lens[0] until a point fails; record the max
    max_len_cap: int = 131072      # find_max_len stops here even if nothing failed
    out_dir: str = ""              # "" = the Hydra run/sweep directory


@dataclasses.dataclass
class ProtocolConfig:
    """Whose settings the models run with (`protocol=paper|lra`, configs/protocol/).

    paper (default): each method as its paper defines it. lra: the settings of LRA's own code
    (google-research/long-range-arena), so rows compare with LRA Table 1: configs/protocol_model/
    lra/<model>.yaml sets each model's fields, reading the two task-level values below
    (configs/protocol_task/lra/<task>.yaml) that LRA's shared encoder applied."""
    name: str = "paper"
    # LRA's attention_dropout_rate (0.1; cifar10 0.2), for the models whose LRA attention used it.
    attention_dropout: float = 0.0
    # LRA's position embedding (learn_pos_emb: sinusoidal; cifar10 learned). "" = model default.
    pos: str = ""


@dataclasses.dataclass
class Config:
    task: Any = MISSING
    model: Any = MISSING
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    preset: str = "small"
    seed: int = 0
    skip_done: bool = True         # a run dir that already holds a finished result is skipped
    fresh_process: bool = True     # -m (hydra/launcher=pool): each point in a worker of its own (own peak memory)
    point_timeout_s: float = 0.0   # a sweep point's wall-clock limit, then timeout (0: none)
    preview: bool = False          # lra.data: also write a preview of samples (where a task has one)
    # The lra.suite task this run is a cell of (set by configs/suite/<task>.yaml): the report
    # names its column so ("induction L=64"), not by the task's settings ("copy (induction)").
    suite_task: str = ""
    # Modules imported before anything is built, in every process: user attention/tasks
    # (`@register`, `@register_task`); see lra.plugins.
    plugins: list[str] = dataclasses.field(default_factory=list)
    # JAX persistent compilation cache: repeated runs of one shape skip compilation ("" = off).
    compile_cache_dir: str = "${oc.env:LRA_JAX_CACHE,'~/.cache/lra-bench/jax'}"
    # Tracking (lra.train.tracking): tensorboard (event files in <run dir>/tb), wandb, none,
    # or a list: logger=[tensorboard,wandb].
    logger: Any = "tensorboard"


# Each config key's role in defining an experiment, declared once. Every consumer derives from
# this table: the checkpoint fingerprint (lra.train.checkpoint.fingerprint: a resume must match it),
# report labels (lra.labels.label_variants: runs of one model that differ in a labelled key are
# different experiments, not seeds to average) and the run-dir tag (lra.cli.tag: runs that differ
# in a tagged key get different directories, so skip_done never takes one for the other).
ROLE_USES: dict[str, frozenset] = {
    "identity": frozenset({"fingerprint", "label", "tag", "row"}),  # what the run computes
    "axis": frozenset({"fingerprint", "row"}),  # named in the run dir; the tables' own axes
    "named": frozenset({"row"}),               # named in the run dir and labelled "(preset)"
    "budget": frozenset({"label", "tag", "row"}),  # changes the numbers; a resume may change it
    "tuned": frozenset({"fingerprint", "tag", "row"}),  # a tuning grid's axis: runs differing
                                               # only here are one experiment's candidates, the
                                               # best on validation reported (select_tuned)
    "location": frozenset({"fingerprint", "label", "tag", "row"}),  # where the data lives
    "context": frozenset({"label", "tag", "row"}),  # extra measurements; protocol settings
                                               # (labelled "[protocol]" by name, not by key)
    "bookkeeping": frozenset(),                # how a run is observed, scheduled or stored
}
# "row": what a result.json's numbers depend on (row_fingerprint): skip_done keeps a row only
# when the command's config has the same; everything but bookkeeping.
# The per-model tuning grid (lra.suite's lr= and wd= keys): MAD and Zoology sweep these per model.
TUNED = ("train.lr", "train.weight_decay")
# Dotted key (or prefix ending in ".") -> role; keys not listed (every model.* and task.* field
# but these, the rest of train.*) are identity.
ROLES: dict[str, str] = {
    "seed": "axis", "task.seq_len": "axis", "preset": "named",
    **dict.fromkeys(TUNED, "tuned"),
    **dict.fromkeys(("train.max_time_s", "train.eval_batches", "train.timing_warmup_steps",
                     "train.solve_at", "train.patience", "train.min_delta", "train.early_stop"),
                    "budget"),
    "task.data_dir": "location",
    **dict.fromkeys(("eval.", "protocol."), "context"),
    **dict.fromkeys(("train.progress", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.resume", "train.data_parallel", "skip_done",
                     "fresh_process", "point_timeout_s", "compile_cache_dir", "plugins", "preview",
                     "task.cache_dir",  # where generated data is kept: content-keyed, same numbers
                     "logger", "dist.", "bench.", "suite_task"), "bookkeeping"),
}


def role(key: str) -> str:
    """The role of a dotted config key (ROLES; unlisted keys are identity)."""
    for prefix, name in ROLES.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return name
    return "identity"


def used_for(key: str, use: str) -> bool:
    """Whether `key` counts for `use`: fingerprint, label or tag (see ROLE_USES)."""
    return use in ROLE_USES[role(key)]


def row_fingerprint(config: dict) -> str:
    """Hash of the resolved config's keys a result row's numbers depend on (use "row": all but
    bookkeeping). A row made under another one is stale for this command (lra.run's skip_done)."""
    keyed = experiment_keys(config, "row")
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict, limit: int = 3) -> str:
    """'key: a -> b, ...' for the row keys where two resolved configs differ (the first `limit`,
    then how many more)."""
    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                       else {f"{prefix}{key}": value})
        return out

    a, b = flat(experiment_keys(old, "row")), flat(experiment_keys(new, "row"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))
    shown = [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# Sections that are off unless switched on: (the switch key, its off value). Off, a section
# changes nothing a run computes, so none of its keys counts for any use (and rows made before
# the section existed keep their fingerprints).
SWITCHES: dict[str, tuple[str, Any]] = {"train.pretrain": ("objective", "none")}


def experiment_keys(config: dict, use: str, prefix: str = "") -> dict:
    """The nested part of a plain config that counts for `use` (empty sections and sections
    switched off dropped)."""
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        switch = SWITCHES.get(dotted)
        if switch and isinstance(value, dict) and value.get(switch[0], switch[1]) == switch[1]:
            continue
        if isinstance(value, dict):
            inner = experiment_keys(value, use, dotted + ".")
            if inner:
                out[key] = inner
        elif used_for(dotted, use):
            out[key] = value
    return out


# Start-up range checks: key -> (test, the allowed range in words). Keys a config lacks (another
# task's fields) are skipped; task-specific fields are checked by each task when it is built.
_GE = {1: "an integer >= 1", 0: "a number >= 0", -1: "an integer >= -1"}
RANGES: dict[str, tuple] = {
    **{f"train.{k}": (lambda v: v >= 1, _GE[1]) for k in (
        "batch_size", "steps", "eval_every", "log_every", "keep_checkpoints")},
    **{f"train.{k}": (lambda v: v >= 0, _GE[0]) for k in (
        "warmup_steps", "weight_decay", "grad_clip", "eval_batches", "max_time_s",
        "timing_warmup_steps", "patience", "min_delta")},
    "train.solve_at": (lambda v: 0 < v <= 1, "an accuracy in (0, 1]"),
    **{f"train.{k}": (lambda v: v > 0, "a number > 0") for k in ("lr", "ssm_lr", "eps")},
    **{f"train.{k}": (lambda v: 0 <= v < 1, "in [0, 1)") for k in ("b1", "b2")},
    "train.pretrain.steps": (lambda v: v >= 1, _GE[1]),
    "train.pretrain.lr": (lambda v: v >= 0, _GE[0] + " (0 = train.lr)"),
    "train.pretrain.mask_rate": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.checkpoint_every": (lambda v: v >= -1, _GE[-1] + " (-1 = never, 0 = only at the end)"),
    **{f"model.{k}": (lambda v: v >= 1, _GE[1]) for k in (
        "emb_dim", "num_heads", "num_layers", "mlp_dim")},
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.attention.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "task.seq_len": (lambda v: v >= 1, _GE[1]),
    # num_* = 0 means "the whole split" for released data (text, image, retrieval: their
    # dataclass default is 0, see range_errors); generated tasks need >= 1 examples.
    **{f"task.{k}": (lambda v: v >= 1, _GE[1]) for k in ("num_train", "num_val", "num_test")},
    **{f"bench.{k}": (lambda v: v >= 1, _GE[1]) for k in ("batch_size", "steps", "max_len_cap")},
    **{k: (lambda v: v >= 0, _GE[0]) for k in (
        "bench.warmup_steps", "bench.point_timeout_s", "point_timeout_s", "seed")},
    "bench.seq_lens": (lambda v: len(v) > 0 and all(x >= 1 for x in v),
                       "a non-empty list of integers >= 1"),
    "eval.seq_lens": (lambda v: all(x >= 1 for x in v), "a list of integers >= 1"),
}


def range_errors(cfg) -> list[str]:
    """One line per out-of-range value of a composed config (empty when all are fine)."""
    errors = []
    for key, (ok, allowed) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if OmegaConf.is_list(value):
            value = list(value)
        if key.startswith("task.num_") and value == 0 and _zero_is_whole_split(cfg, key):
            continue
        if not _finite(value):  # inf passes v > 0 and v >= 0; nan fails them with no reason
            errors.append(f"{key}={value} is out of range: use {allowed} (finite: not inf or nan)")
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            errors.append(f"{key}={value} is out of range: use {allowed}")
    return errors


def _finite(value) -> bool:
    """False for a float inf/nan, or a list holding one (`train.lr=inf` parses as a float)."""
    values = value if isinstance(value, list) else [value]
    return not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def _zero_is_whole_split(cfg, key: str) -> bool:
    """Whether the task's own config defaults `key` (task.num_train, ...) to 0 = the whole split."""
    task_cls = OmegaConf.get_type(cfg.task)
    field = key.partition(".")[2]
    fields = {f.name: f for f in dataclasses.fields(task_cls)} \
        if dataclasses.is_dataclass(task_cls) else {}
    return field in fields and fields[field].default == 0


def yaml_kinds() -> set[str]:
    """The attention kinds configs/model/*.yaml build on (`/schema/model/<kind>@_here_`): a kind
    one of them covers (dense, by transformer.yaml) gets no `model=<kind>` of its own."""
    return {m.group(1) for p in (CONFIG_DIR / "model").glob("*.yaml")
            for m in re.finditer(r"/schema/model/(\w+)@", p.read_text())}


def pattern_lengths() -> list[int]:
    """The lengths `patterns=` offers: configs/patterns/L<n>.yaml."""
    return sorted(int(p.stem[1:]) for p in (CONFIG_DIR / "patterns").glob("L*.yaml"))


def register() -> None:
    """Store the config schemas: one per registered attention kind and task, and a `model=<kind>`
    config for each registered kind without a YAML in configs/model (a plugin's: its config
    comes from its dataclass)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    yamls = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    covered = yaml_kinds()
    for kind in models.attention.REGISTRY:
        node = ModelConfig(attention=models.attention.config_class(kind)())
        cs.store(group="schema/model", name=kind, node=node)
        if kind not in yamls and kind not in covered:  # built-in or plugin: the YAML is optional
            cs.store(group="model", name=kind,
                     node=ModelConfig(name=kind, attention=models.attention.config_class(kind)()))
    for length in pattern_lengths():  # patterns=L<n>: each variant's sizes for that length
        for kind in models.attention.REGISTRY:
            sizes = models.attention.config_class(kind)().pattern(length)
            if sizes:
                cs.store(group=f"patterns_model/L{length}", name=kind, node=sizes,
                         package="model.attention")
    for name in tasks.REGISTRY:
        cs.store(group="schema/task", name=name, node=tasks.config_class(name)())
        if not (CONFIG_DIR / "task" / f"{name}.yaml").is_file():
            cs.store(group="task", name=name, node=tasks.config_class(name)())


def from_container(data: dict):
    """Rebuild a typed (structured) config from a resolved plain dict, e.g. a saved config."""
    plugins.load(data.get("plugins") or [])  # a point's or bench worker's own process
    attn = models.attention.config_class(data["model"]["attention"]["kind"])()
    schema = Config(task=tasks.config_class(data["task"]["name"])(),
                    model=ModelConfig(attention=attn))
    plain = {k: v for k, v in data.items() if k != "hydra"}
    return OmegaConf.merge(OmegaConf.structured(schema), plain)


# The config groups the harness names (its own, beside Hydra's): what --help lists.
GROUPS = ("model", "task", "preset", "protocol", "patterns", "suite")


def choices(group: str, searchpath: list[str] = ()) -> list[str]:
    """The options of a config group: configs/<group>/*.yaml, the `hydra.searchpath` entries'
    <group>/*.yaml, and registered ones (a plugin's `model=<kind>` / `task=<name>` stored from
    its dataclass, see lra.config.register)."""
    stored = ConfigStore.instance().repo.get(group, {})
    names = {p.stem for d in [CONFIG_DIR, *search_dirs(searchpath)] for p in (d / group).glob("*.yaml")}
    names |= {n.removesuffix(".yaml") for n, node in stored.items() if not isinstance(node, dict)}
    return sorted(names)


def search_dirs(searchpath: list[str]) -> list[Path]:
    """Directories named by `hydra.searchpath=[file:///dir, pkg://module.sub, dir]` overrides."""
    dirs = []
    for override in searchpath:
        for entry in override.partition("=")[2].strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if entry.startswith("pkg://"):
                module, _, sub = entry.removeprefix("pkg://").partition("/")
                try:
                    dirs.append(Path(str(importlib.resources.files(module))) / sub)
                except (ModuleNotFoundError, TypeError):
                    continue
            elif entry:
                dirs.append(Path(entry.removeprefix("file://")))
    return dirs
