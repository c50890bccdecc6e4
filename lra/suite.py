"""python -m lra.suite [preset=small|tiny] [out=DIR] [seeds=N] [workers=N] [models=[a,b]]
                      [tasks=[t,u]] [plugins=[mod]] [bench=true|false] [locality=true|false]
                      [lr=[a,b,..]] [wd=[a,b,..]] [launcher=NAME hydra.launcher.KEY=V ..]
                      [compare=reference [reference=FILE]] [spt=true] [--dry-run]

Every registered model (plugins included) on the suite's tasks, the locality diagnostic and the
Table 2 bench, then the report in DIR/report/. What runs is configs/suite_plan.yaml: each task is
configs/suite/<task>.yaml, one Hydra multirun of `lra.run` over models x seeds with lra.sweep.pool's
launcher (`workers` points at a time, slowest models first); the bench runs alone afterwards.
Re-running the same command resumes: finished points are skipped (skip_done), killed ones resume
from their checkpoints. A failed point is a row with its status; the suite goes on.

launcher=submitit_slurm (with any hydra.launcher.KEY=VALUE, e.g. hydra.launcher.partition=gpu;
pip install -e ".[cluster]") sends the training points to a cluster through Hydra's launcher
instead of the local pool; the bench still runs here, alone. Re-running resumes as locally.

lr= and wd= are the tuning grid (the preset's `lr` / `wd` in configs/suite_plan.yaml by default):
every model trains at each learning rate (x weight decay) and the report keeps, per model and
task, the one with the best validation accuracy (lra.labels.select_tuned; never test). One value
(lr=[1e-3]) is one shared setting, as LRA ran.

spt=true also trains every model on every task with self-pretraining (Amos, Berant & Gupta,
ICLR 2024; train.pretrain): the same total train.steps, the first half masked-token denoising
on the task's own training inputs (labels never read), the rest the task; its points land in
DIR/spt/, and the report puts each model's "+spt(masked)" row beside its row from scratch in
Table 1, with the change of its Avg and rank in the "Self-pretraining" table.

compare=reference (with models=[mine], plugins=[my.module]) trains only your models on the tasks
of a reference file (results/reference/<preset>.json in the checkout, or reference=FILE: a
suite's runs exported by `python -m lra.reference export DIR`) and reports them beside its rows,
labelled "(ref)", the file's commit, date and hardware in Table 1's caption. The locality runs
come from the file; the bench runs your models beside transformer and flash here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

from lra import cli, reference
from lra import plugins as loader
from lra.config import CONFIG_DIR, register
from lra.sweep.executor import Executor, Job, Sweep
from lra.reference import materialise
from lra.results import read_rows, row_finished
from lra.run import task as run_task

cli.setup()  # the command line's plugins=[...], then the schemas (before any compose)

PLAN = CONFIG_DIR / "suite_plan.yaml"
KEYS = ("preset", "out", "seeds", "workers", "models", "tasks", "plugins", "bench", "locality",
        "lr", "wd", "launcher", "compare", "reference", "spt")
SPT_OBJECTIVE = "masked"  # every model supports it (lra.train.pretrain)


@dataclasses.dataclass
class Step:
    """One Hydra multirun: `module` with `args`, its points landing under `dir`."""
    name: str            # a suite task, "locality:<task>" or "bench"
    module: str          # lra.run | lra.bench
    args: list[str]
    dir: Path
    points: int
    est_s: float         # estimated wall seconds for the whole step
    xla_flags: str = ""  # added to the step's XLA_FLAGS (its workers' threading)

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, "-m", *self.args]

    def shown(self) -> str:
        """The command as a shell line (`python -m ...`, its XLA_FLAGS in front when set)."""
        flags = f"XLA_FLAGS='{self.xla_flags}' " if self.xla_flags else ""
        return flags + "python " + " ".join(self.command()[1:])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.xla_flags:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {self.xla_flags}".strip()
        return env


def worker_threads(workers: int) -> str:
    """XLA flags for training points run `workers` at a time: one XLA thread each when that is
    a core each (two 2-thread processes on 2 cores run a small step ~5-10% slower than two
    1-thread ones, measured at L=64); nothing otherwise. The bench always runs alone, as set."""
    cores = os.cpu_count() or 1
    if workers > 1 and cores // workers == 1:
        return "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return ""


def parse(argv: list[str]) -> tuple[dict, bool]:
    """key=value arguments (the keys in KEYS) and --dry-run; anything else is a one-line error."""
    opts, dry = {}, False
    for arg in argv:
        if arg in ("--dry-run", "-n"):
            dry = True
            continue
        key, sep, value = arg.partition("=")
        if not sep or (key not in KEYS and not key.startswith("hydra.launcher.")):
            cli.fail(f"unknown argument {arg!r}; lra.suite takes {', '.join(k + '=' for k in KEYS)} "
                     f"and --dry-run (see python -m lra.suite --help)")
        opts[key] = value
    return opts, dry


def listed(value: str) -> list[str]:
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def grid(opts: dict, key: str, default) -> list[float]:
    """The tuning grid's values for `key` (lr, wd): the command line's list, else the preset's;
    a one-line error for anything but positive numbers (wd: >= 0)."""
    values = listed(opts[key]) if key in opts else [str(v) for v in (default or [])]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    low_ok = (lambda v: v >= 0) if key == "wd" else (lambda v: v > 0)
    if (key in opts and not numbers) or len(numbers) != len(values) \
            or not all(low_ok(v) and v < float("inf") for v in numbers):
        cli.fail(f"{key}={opts.get(key, default)}: use a list of numbers "
                 f"{'>= 0' if key == 'wd' else '> 0'}, e.g. {key}=[1e-4,1e-3]")
    return numbers


def flag(opts: dict, key: str, default: str = "true") -> bool:
    value = opts.get(key, default).lower()
    if value not in ("true", "false"):
        cli.fail(f"{key}={value}: use {key}=true or {key}=false")
    return value == "true"


def positive(opts: dict, key: str, default: int) -> int:
    value = opts.get(key, str(default))
    if not value.isdigit() or int(value) < 1:
        cli.fail(f"{key}={value}: use an integer >= 1")
    return int(value)


def launchers() -> list[str]:
    """The hydra/launcher choices installed (Hydra's plugins discovered, lra's pool included)."""
    Plugins.instance()  # imports hydra_plugins.*: each launcher stores its config
    stored = ConfigStore.instance().repo.get("hydra", {}).get("launcher", {})
    return sorted(name.removesuffix(".yaml") for name in stored)


def all_models(plugins: list[str]) -> list[str]:
    """configs/model/*.yaml and every kind a plugin registers (stored as `model=<kind>`)."""
    loader.load(plugins)
    register()  # idempotent: stores model=<kind> for each plugin kind now registered
    return cli.choices("model")


def composed(task: str, overrides: list[str]):
    """A suite task's config as its points compose it (its length decides which locality
    windows are not dense; its train.steps, self-pretraining's share)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"suite={task}", *overrides])


def spt_step(step: Step, task: str, overrides: list[str], out: Path) -> Step:
    """`step` (a task's training points) self-pretrained at the same total budget: the first
    half of its train.steps pretrains (SPT_OBJECTIVE), the rest trains the task."""
    half = int(composed(task, overrides).train.steps) // 2
    return dataclasses.replace(
        step, name=f"{task}+spt", dir=out / "spt" / task,
        args=[*(a for a in step.args if not a.startswith("hydra.sweep.dir=")),
              f"train.pretrain.objective={SPT_OBJECTIVE}", f"train.pretrain.steps={half}",
              f"hydra.sweep.dir={out / 'spt' / task}"])


def check_names(models: list[str], known: list[str], tasks: list[str]) -> None:
    """Every model known (built in, or a plugin's), every task a suite task; else one line."""
    for m in models:
        if m not in known:
            cli.fail(f"models: unknown model {m!r}; known: {', '.join(known)} (a plugin's kind "
                     f"needs plugins=[its.module])")
    suite_tasks = cli.choices("suite")
    for t in tasks:
        if t not in suite_tasks or t == "none":
            cli.fail(f"tasks: unknown suite task {t!r}; known: "
                     f"{', '.join(x for x in suite_tasks if x != 'none')} (configs/suite/)")


def launcher_args(opts: dict, workers: int) -> list[str]:
    """The training multiruns' launcher: the pool with `workers` points at a time, or a cluster's
    Hydra launcher (`launcher=submitit_slurm` and its hydra.launcher.* keys)."""
    if "launcher" not in opts:
        return ["hydra/launcher=pool", f"hydra.launcher.n_jobs={workers}"] if workers > 1 else []
    known_launchers = launchers()
    if opts["launcher"] not in known_launchers:
        cli.fail(f"launcher={opts['launcher']}: Hydra knows {', '.join(known_launchers)} "
                 f"(submitit_slurm / submitit_local: pip install -e \".[cluster]\")")
    return [f"hydra/launcher={opts['launcher']}",
            *(f"{k}={v}" for k, v in opts.items() if k.startswith("hydra.launcher."))]


def build_plan(opts: dict) -> tuple[list[Step], dict]:
    plan = OmegaConf.load(PLAN)
    preset = opts.get("preset", "small")
    if preset not in plan.presets:
        cli.fail(f"preset={preset}: lra.suite has presets {', '.join(plan.presets)}")
    pre = plan.presets[preset]
    out = Path(opts.get("out", f"results/suite-{preset}"))
    seeds = positive(opts, "seeds", pre.seeds)
    workers = positive(opts, "workers", min(os.cpu_count() or 1, 2))
    plugins = listed(opts.get("plugins", ""))
    known = all_models(plugins)
    # a preset may name its own models, tasks, and whether the locality and bench steps run
    models = listed(opts["models"]) if "models" in opts else list(pre.get("models") or known)
    tasks = listed(opts["tasks"]) if "tasks" in opts else list(pre.get("tasks") or plan.tasks)
    for key in ("locality", "bench"):
        if key not in opts and key in pre:
            opts = {**opts, key: str(pre[key]).lower()}
    ref = compare_reference(opts, preset, tasks)
    if ref and flag(opts, "spt", "false"):
        cli.fail("spt=true with compare=reference: the reference rows were trained from scratch "
                 "only, so no rank with self-pretraining compares; drop one of them")
    if ref:
        tasks = ref["tasks"]
        opts = {"locality": "false", **opts}  # the reference carries the locality runs
    check_names(models, known, tasks)
    common = list(pre.overrides) + ([f"plugins=[{','.join(plugins)}]"] if plugins else [])
    launcher = launcher_args(opts, workers)
    seed_arg = f"seed={','.join(str(s) for s in range(seeds))}"
    lrs, wds = grid(opts, "lr", pre.get("lr")), grid(opts, "wd", pre.get("wd"))
    tuning = ([f"train.lr={','.join(map(repr, lrs))}"] if lrs else []) + \
             ([f"train.weight_decay={','.join(map(repr, wds))}"] if wds else [])
    candidates = max(len(lrs), 1) * max(len(wds), 1)
    est = pre.est_point_s
    threads = worker_threads(workers)
    hint = dict(plan.get("cost_hint", {}))
    costs = model_costs(out / "runs", hint)  # a resumed suite's finished tasks, else the hint
    steps = []
    budget = dict(pre.get("steps") or {})  # a preset's own train.steps per task
    for task in tasks:
        own = [f"train.steps={budget[task]}"] if task in budget else []
        step = Step(task, "lra.run",
                    [f"suite={task}", f"model={','.join(models)}", seed_arg, *tuning, *own, *common,
                     *launcher, f"hydra.sweep.dir={out / 'runs' / task}"],
                    out / "runs" / task, len(models) * seeds * candidates,
                    est.get(task, est.locality) * len(models) * seeds * candidates / workers,
                    threads)
        steps.append(slowest_first(step, costs))
        if flag(opts, "spt", "false"):
            steps.append(spt_step(steps[-1], task, [*own, *common], out))
    loc = plan.locality
    if flag(opts, "locality") and loc.model in known:
        for task in tasks:
            length = int(composed(task, common).task.seq_len)
            windows = [w for w in loc.windows if w < length]
            if windows:
                # the same tuning grid as the models it is compared with (dense's chosen lr)
                steps.append(Step(f"locality:{task}", "lra.run",
                                  [f"suite={task}", f"model={loc.model}",
                                   f"{loc.key}={','.join(map(str, windows))}", seed_arg, *tuning,
                                   *([f"train.steps={budget[task]}"] if task in budget else []),
                                   *common, *launcher, f"hydra.sweep.dir={out / 'locality' / task}"],
                                  out / "locality" / task, len(windows) * seeds * candidates,
                                  est.locality * len(windows) * seeds * candidates / workers,
                                  threads))
    if flag(opts, "bench"):
        lengths = list(pre.bench_seq_lens)
        # beside a reference, the bench's baselines run here too (speed is this machine's)
        benched = models + [m for m in ("transformer", "flash") if ref and m not in models]
        steps.append(Step("bench", "lra.bench",
                          [f"model={','.join(benched)}", f"task={plan.bench.task}",
                           f"bench.seq_lens=[{','.join(map(str, lengths))}]", *plan.bench.overrides,
                           *pre.bench_overrides,
                           *([f"plugins=[{','.join(plugins)}]"] if plugins else []),
                           f"hydra.sweep.dir={out / 'bench'}"],
                          out / "bench", len(benched) * len(lengths),
                          est.bench * len(benched) * len(lengths)))
    return steps, {"out": out, "preset": preset, "seeds": seeds, "workers": workers, "opts": opts,
                   "models": models, "tasks": tasks, "cost_hint": hint, "lr": lrs, "wd": wds,
                   "reference": ref}


def compare_reference(opts: dict, preset: str, tasks: list[str]) -> dict | None:
    """compare=reference: the reference file (reference=PATH, else the preset's shipped one),
    loaded and checked at start-up: {"data", "path", "tasks"}; None without compare."""
    if "compare" not in opts:
        if "reference" in opts:
            cli.fail("reference=PATH is read only with compare=reference")
        return None
    if opts["compare"] != "reference":
        cli.fail(f"compare={opts['compare']}: the one comparison is compare=reference")
    if "models" not in opts:
        cli.fail("compare=reference trains only your models: name them, e.g. models=[mine] "
                 "plugins=[my.module]")
    path = Path(opts.get("reference") or reference.default_path(preset))
    try:
        data = reference.load(path)
    except SystemExit as e:
        cli.fail(str(e).removeprefix("error: "))
    meta = data["meta"]
    if meta.get("preset") != preset:
        cli.fail(f"{path} holds preset={meta.get('preset')} runs, not preset={preset}: use "
                 f"preset={meta.get('preset')} or reference=<a preset={preset} file>")
    covered = [t for t in (listed(opts["tasks"]) if "tasks" in opts else tasks)
               if t in meta.get("tasks", [])]
    missing = [t for t in listed(opts.get("tasks", "")) if t not in covered]
    if missing or not covered:
        cli.fail(f"tasks {', '.join(missing) or 'of this preset'}: no reference rows in {path} "
                 f"(it has {', '.join(meta.get('tasks', [])) or 'none'})")
    return {"data": data, "path": path, "tasks": covered}


def model_costs(runs: Path, hint: dict) -> dict[str, float]:
    """Each model's training cost relative to the others: its wall time on every suite task
    finished under `runs` over that task's median, averaged over tasks; `hint` (the plan's
    measured costs) for models with no finished point yet."""
    walls: dict[str, dict[str, list[float]]] = {}  # task -> model -> wall seconds
    for row in read_rows([runs])[0]:  # unreadable files are left out
        if row["status"] == "ok" and row.get("wall_time_s"):
            task = Path(row["path"]).relative_to(runs).parts[0]
            walls.setdefault(task, {}).setdefault(row["model"], []).append(row["wall_time_s"])
    relative: dict[str, list[float]] = {}
    for per_model in walls.values():
        median = statistics.median(w for ws in per_model.values() for w in ws)
        for model, ws in per_model.items():
            relative.setdefault(model, []).append(statistics.mean(ws) / median)
    return {**{m: float(c) for m, c in hint.items()},
            **{m: statistics.mean(r) for m, r in relative.items()}}


def slowest_first(step: Step, costs: dict[str, float]) -> Step:
    """`step` with its `model=` list ordered by cost, slowest first (stable; unknown models cost
    1, the median): with points run two at a time the longest point no longer starts last and
    runs alone at the end (longest-processing-time-first scheduling)."""
    args = list(step.args)
    for i, arg in enumerate(args):
        if arg.startswith("model="):
            models = arg[len("model="):].split(",")
            models.sort(key=lambda m: -costs.get(m, 1.0))
            args[i] = "model=" + ",".join(models)
    return dataclasses.replace(step, args=args)


def done_points(step: Step, since: float | None = None) -> int:
    """Points of `step` with a row that the sweep will not run again (lra.results.row_finished),
    or, with `since` (a time.time()), any row written since then: an `interrupted` or `killed`
    row left by an earlier session is still to do (it resumes), one written now is done."""
    count = 0
    for path in step.dir.rglob("result.json") if step.dir.exists() else ():
        try:
            if since is not None and path.stat().st_mtime >= since:
                count += 1
                continue
            row = json.loads(path.read_text())
            count += isinstance(row, dict) and row_finished(row)
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # half-written: not done yet
    return min(step.points, count)


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Overall progress and an ETA: the points left at their estimated cost, rescaled by how
    long the points finished in this session really took. The rate is measured from the first
    point this session finished on, so the one-off start (worker processes importing JAX, the
    first compilations) is not charged to every point left (it made the tiny suite's ETA read
    15 h after its first point)."""

    def __init__(self, steps: list[Step], clock_fn=time.monotonic):
        self.steps, self.clock = steps, clock_fn
        self.start = clock_fn()
        self.since = time.time()  # rows written from now on are this session's points
        self.base = {s.name: done_points(s) for s in steps}  # already there: skipped, not timed
        self.first: tuple[float, float] | None = None  # (time, estimated cost done) at the first
        self.tty = sys.stdout.isatty()
        self.last, self.printed = "", 0.0

    def line(self, current: Step) -> str:
        done = {s.name: done_points(s, self.since) for s in self.steps}
        total, finished = sum(s.points for s in self.steps), sum(done.values())
        per_point = {s.name: s.est_s / s.points for s in self.steps}
        new_est = sum((done[s.name] - self.base[s.name]) * per_point[s.name] for s in self.steps)
        left_est = sum((s.points - done[s.name]) * per_point[s.name] for s in self.steps)
        now = self.clock()
        if self.first is None and new_est > 0:
            self.first = (now, new_est)
        scale = 1.0  # the plan's estimate until a second point has finished
        if self.first is not None and new_est > self.first[1]:
            scale = (now - self.first[0]) / (new_est - self.first[1])
        return (f"[suite] {finished}/{total} points | {current.name}: {done[current.name]}/"
                f"{current.points} | elapsed {clock(now - self.start)} | ETA "
                f"{clock(left_est * scale)}")

    def show(self, current: Step, final: bool = False) -> None:
        """A terminal gets the line refreshed in place; a log (SLURM, a pipe) gets a new line
        when a point finishes and at least once a minute."""
        text = self.line(current)
        counts = text.split(" | elapsed")[0]
        if self.tty:
            print("\r" + text, end="\n" if final else "", flush=True)
        elif final or counts != self.last or self.clock() - self.printed >= 60:
            print(text, flush=True)
        else:
            return
        self.last, self.printed = counts, self.clock()


class Stopped(Exception):
    """SIGTERM reached the suite (a scheduler's stop): handled like Ctrl-C."""


def _stop(signum, frame) -> None:
    raise Stopped(f"signal {signum}")


def run_step(step: Step, progress: Progress, log: Path, poll_s: float = 5.0) -> int:
    """One multirun as a child process (its output in `log`), the progress line refreshed while it
    works. Returns its exit code; the suite goes on whatever it is."""
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {step.shown()}\n")
        out.flush()
        # Its own process group, so a stop reaches the launcher's workers and every point.
        child = subprocess.Popen(step.command(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=step.env())
        try:
            while child.poll() is None:
                progress.show(step)
                time.sleep(poll_s)
        except (KeyboardInterrupt, Stopped):
            # The multirun passes it on to its points: each checkpoints and records
            # `interrupted`, and the next `lra.suite` with the same arguments resumes them.
            os.killpg(child.pid, signal.SIGINT)  # as Ctrl-C in a terminal would
            child.wait()
            raise
    progress.show(step, final=True)
    print(f"[suite] {step.name} ended in {clock(time.monotonic() - started)} (exit "
          f"{child.returncode}; its table of points: {log})", flush=True)
    return child.returncode


def sweep_of(step: Step, hydra, log: Path):
    """A training step as the executor's sweep (what `python -m lra.run -m <its args>` would
    run, composed here): the master config, the sweep's record begun (its callbacks), Hydra's
    multirun.yaml, and the points' overrides as Hydra's basic sweeper expands them."""
    config = hydra.compose_config(config_name="config", overrides=list(step.args),
                                  with_log_configuration=False, run_mode=RunMode.MULTIRUN)
    callbacks = Callbacks(config)
    with log.open("a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        callbacks.on_multirun_start(config=config, config_name="config")
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(
        list(config.hydra.overrides.task))
    points = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    env = {"XLA_FLAGS": step.env()["XLA_FLAGS"]} if step.xla_flags else {}
    sweep = Sweep(run_task, HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                  config, env=env, log=log)
    return sweep, points


def run_pool(steps: list[Step], workers: int, progress: Progress, logs: Path) -> None:
    """Every training step's points through one executor, `workers` at a time: a task's last
    points run beside the next task's first ones, so no core waits for a task to end. Each
    step's output goes to logs/<step>.log, its table of points there at the end."""
    started = time.monotonic()
    # job_name "run": the points' run.log and ids are lra.run's
    with initialize_config_dir(config_dir=str(CONFIG_DIR), job_name="run", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        sweeps, jobs = {}, []
        for step in steps:
            log = logs / f"{step.name.replace(':', '-')}.log"
            with log.open("a") as out:
                out.write(f"$ {step.shown()}\n")
            sweep, points = sweep_of(step, hydra, log)
            sweeps[step.name] = (step, sweep, log)
            jobs += [Job(i, overrides, sweep) for i, overrides in enumerate(points)]

        ended: set[str] = set()
        executor = Executor(min(workers, len(jobs)), tick_s=5.0)

        def tick(final: bool = False) -> None:
            left = [s for s in steps if done_points(s, progress.since) < s.points]
            progress.show(left[0] if left else steps[-1], final=final)
            for step in steps:  # a step's end, once: its record closed, its table in its log
                if step.name in ended or not (final or (step not in left
                                                        and not executor.stopping)):
                    continue
                ended.add(step.name)
                _, sweep, log = sweeps[step.name]
                with log.open("a") as out, contextlib.redirect_stdout(out):
                    sweep.hydra_context.callbacks.on_multirun_end(config=sweep.config,
                                                                  config_name="config")
                if not executor.stopping:
                    print(f"[suite] {step.name} ended in {clock(time.monotonic() - started)} "
                          f"(its table of points: {log})", flush=True)

        executor.tick = tick
        try:
            executor.run(jobs)
        finally:
            tick(final=True)


def write_report(info: dict) -> Path:
    from lra.report import build_report  # pandas and matplotlib: loaded for the report only

    out = info["out"]
    paths = [str(p) for p in (out / "runs", out / "spt", out / "bench", out / "reference" / "runs")
             if p.exists()]
    locality = [str(p) for p in (out / "locality", out / "reference" / "locality") if p.exists()]
    build_report(paths, out / "report", locality_paths=locality, quiet=True)
    return out / "report" / "report.html"


def main(argv: list[str] | None = None) -> None:
    cli.restore_sigint()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    opts, dry = parse(argv)
    steps, info = build_plan(opts)
    for step in steps:  # bad overrides die here, in one line, before anything runs
        cli.check_overrides(["-m", *step.args],
                            config_name="bench" if step.module == "lra.bench" else "config")
    total_s = sum(s.est_s for s in steps)
    tuned = "".join(f" x {key} {info[key]}" for key in ("lr", "wd") if info[key])
    print(f"lra.suite preset={info['preset']}: {len(info['models'])} models x {len(info['tasks'])} "
          f"tasks x {info['seeds']} seed(s){tuned}, {info['workers']} point(s) at a time -> "
          f"{info['out']}")
    for s in steps:
        print(f"  {s.name:<22} {s.points:>4} points  ~{clock(s.est_s)}  ({s.dir})")
    print(f"  {'total':<22} {sum(s.points for s in steps):>4} points  ~{clock(total_s)} estimated")
    ref = info["reference"]
    if ref:
        meta = ref["data"]["meta"]
        print(f"  beside {meta['runs']} reference rows of {len(meta['models'])} models from "
              f"{ref['path']} (commit {meta.get('commit')}, {meta.get('date')}, "
              f"{meta.get('hardware')}), labelled '(ref)' in the report")
    if dry:
        for s in steps:
            print("$ " + s.shown())
        return
    signal.signal(signal.SIGTERM, _stop)
    logs = info["out"] / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress = Progress(steps)
    failed = []
    # Locally every training point goes through one executor; a named Hydra launcher (a cluster)
    # gets each step as its multirun. The bench runs alone afterwards, each length in a fresh
    # process.
    pooled = [] if "launcher" in info["opts"] else [s for s in steps if s.module == "lra.run"]
    try:
        if pooled:
            run_pool(pooled, info["workers"], progress, logs)
        for step in (s for s in steps if s not in pooled):
            code = run_step(step, progress, logs / f"{step.name.replace(':', '-')}.log")
            if code:
                failed.append(f"{step.name} (exit {code}, log {logs})")
    except (KeyboardInterrupt, Stopped, SystemExit):
        print("\n[suite] stopped; points so far are kept: run the same command to resume")
        raise SystemExit(130) from None
    if ref:  # rewritten from the file every time: the file is the truth
        shutil.rmtree(info["out"] / "reference", ignore_errors=True)
        materialise(ref["data"], ref["path"], info["out"] / "reference")
    html = write_report(info)
    print(f"[suite] done in {clock(time.monotonic() - progress.start)}; report: {html.resolve()}")
    if failed:
        print(f"[suite] steps that exited non-zero (their points are rows with a status): "
              f"{'; '.join(failed)}")


if __name__ == "__main__":
    main()
