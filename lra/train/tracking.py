"""Where a run reports to, and how its numbers read on the console.

`logger=tensorboard` (default): event files in <run dir>/tb (curves, final metrics, the HParams
plugin's session). `logger=wandb`: a Weights & Biases run (WANDB_* variables pass through).
`logger=[tensorboard,wandb]`: both; `logger=none`: neither. Writes happen only where the train
loop already syncs (its log rows) and at the end, never per step. `summary` is the line a run
ends with; `percent`, `rate`, `size` and `duration` round numbers for people.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
from pathlib import Path

from lra.config import role
from lra.results import Status

log = logging.getLogger(__name__)

BACKENDS = {"tensorboard": "tensorboardX", "wandb": "wandb"}  # logger name -> package


def backends(value) -> list[str]:
    """The backends a `logger` value names: one name, a list of names, or none/null."""
    names = [value] if value is None or isinstance(value, str) else list(value)
    names = [n for n in names if n not in (None, "none")]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"logger={unknown[0]} is not a logger; use tensorboard, wandb, none, or "
                         f"both: logger=[tensorboard,wandb]")
    return list(dict.fromkeys(names))


def problem(value) -> str | None:
    """Why `logger=value` cannot run here (an unknown name, a package not installed), or None."""
    try:
        names = backends(value)
    except ValueError as err:
        return str(err)
    for name in names:
        try:
            importlib.import_module(BACKENDS[name])
        except ImportError:
            return f"logger={name} needs the {BACKENDS[name]} package: pip install {BACKENDS[name]}"
    return None


def hparams(config: dict, prefix: str = "") -> dict:
    """The settings that define a run (all but bookkeeping keys, lra.config.ROLES) as flat
    `a.b.c` keys with scalar values: the HParams plugin's columns."""
    flat = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hparams(value, dotted + "."))
        elif value is not None and role(dotted) != "bookkeeping":
            flat[dotted] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def tag(key: str) -> str:
    """The TensorBoard/wandb name of a curve row's key: train_loss -> train/loss."""
    return key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else f"train/{key}"


def finals(result) -> dict[str, float]:
    """The end-of-run metrics a tracker records (those the run has)."""
    peak = result.peak_memory_bytes
    values = {"test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
              "steps_per_s": result.steps_per_s, "tokens_per_s": result.tokens_per_s,
              "peak_memory_mib": peak / 2**20 if peak else None,
              "compile_time_s": result.compile_time_s, "wall_time_s": result.wall_time_s}
    return {f"final/{k}": float(v) for k, v in values.items() if v is not None}


class Tracker:
    """The run's trackers: `start` with its config, `log` with the curve at each logged row,
    `finish` with the result (and `close`, which finish calls; the context manager's exit)."""

    def __init__(self, names: list[str], out_dir: Path):
        self.names, self.out_dir = names, Path(out_dir)
        self.tb = self.wandb = None
        self.sent = 0  # the last step the backends have

    def start(self, config: dict) -> None:
        """Open the backends, each for this attempt alone: <run dir>/tb is replaced and wandb
        gets a new run. A resumed attempt is sent the curve its checkpoint restored (fit logs it
        first), so each holds the whole run and nothing a killed attempt did past it."""
        if "tensorboard" in self.names:
            # optional: only train.logger=tensorboard loads it
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams as hparams_summary

            directory = self.out_dir / "tb"
            shutil.rmtree(directory, ignore_errors=True)
            # Written and flushed by tensorboardX's own thread: off the train loop.
            self.tb = SummaryWriter(str(directory), flush_secs=10)
            # A session start without an experiment summary: TensorBoard's HParams tab then
            # takes the union of every run's columns (models differ in their attention fields).
            self.tb.file_writer.add_summary(hparams_summary(hparams(config), {})[1])
            log.info("tensorboard: events in %s", directory)
        if "wandb" in self.names:
            import wandb  # optional: only train.logger=wandb loads it

            model, task = config["model"]["name"], config["task"]["name"]
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "lra-bench"),
                dir=os.environ.get("WANDB_DIR", str(self.out_dir)), group=task,
                name=f"{model}-{task}-L{config['task']['seq_len']}-s{config['seed']}",
                tags=[model, task, config["preset"]], config=config)

    def log(self, curve: list[dict]) -> None:
        """Send the rows of `curve` (in step order) that the backends do not have yet."""
        first = len(curve)
        while first and curve[first - 1]["step"] > self.sent:
            first -= 1
        for row in curve[first:]:
            scalars = {tag(k): v for k, v in row.items() if k != "step" and math.isfinite(v)}
            if self.tb is not None:
                for name, value in scalars.items():
                    self.tb.add_scalar(name, value, row["step"])
            if self.wandb is not None:
                self.wandb.log(scalars, step=row["step"])
            self.sent = row["step"]

    def finish(self, result) -> None:
        """Record the final metrics and the status, then close. A tracker that fails here is
        a warning: the result is written already."""
        values = finals(result)
        try:
            if self.tb is not None:
                for name, value in values.items():
                    self.tb.add_scalar(name, value, result.steps)
                self.tb.file_writer.add_summary(session_end(result.status), result.steps)
            if self.wandb is not None:
                self.wandb.summary.update({**values, "status": result.status})
                self.wandb.finish(exit_code=0 if result.status in (Status.OK, Status.TIMEOUT) else 1)
                self.wandb = None
        except Exception as err:  # noqa: BLE001 - the run's row is safe; say what went wrong
            log.warning("logger: recording the end of the run failed: %s", err)
        self.close()

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()  # flushes: a full disk fails here, after the row is written
            except OSError as err:
                log.warning("tensorboard: closing its event file failed (%s)", err)
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
            self.wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def session_end(status: str):
    """The HParams plugin's session-end summary: ok/timeout success, interrupted unknown (a re-run
    resumes it; TensorBoard's Status has no 'aborted'), everything else (error, diverged, oom,
    killed) failure."""
    # optional: only train.logger=tensorboard loads it
    from tensorboardX.proto.api_pb2 import Status as SessionStatus
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    name = {Status.OK: "STATUS_SUCCESS", Status.TIMEOUT: "STATUS_SUCCESS",
            Status.INTERRUPTED: "STATUS_UNKNOWN"}.get(status, "STATUS_FAILURE")
    content = HParamsPluginData(session_end_info=SessionEndInfo(status=SessionStatus.Value(name)))
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate(x: float) -> str:
    """Three significant digits, no exponent: 8.00, 43.2, 0.0412, 1234."""
    return f"{x:.0f}" if x >= 99.95 else f"{x:#.3g}"


def size(n_bytes: float) -> str:
    """Binary units, two or three digits: 512 KiB, 95 MiB, 1.2 GiB."""
    value, unit = float(n_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if value >= 10 or unit == "B" else f"{value:.1f} {unit}"


def duration(seconds: float) -> str:
    """4.6s, 74s, 12m05s, 2h03m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 100:
        return f"{seconds:.0f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def summary(result) -> str:
    """The line a run ends with: `<model> on <task> L=<L>: status=ok test_acc=43.9% ...`,
    rounded for people (result.json keeps the raw numbers); missing numbers are left out."""
    total = (result.config or {}).get("train", {}).get("steps")
    fields = {
        "status": result.status,
        "steps": (f"{result.steps}/{total}" if result.status != Status.OK and total else None),
        "test_acc": result.test_accuracy is not None and percent(result.test_accuracy),
        "val_acc": result.val_accuracy is not None and percent(result.val_accuracy),
        "steps/s": bool(result.steps_per_s) and rate(result.steps_per_s),
        "peak": bool(result.peak_memory_bytes) and size(result.peak_memory_bytes),
        "compile": bool(result.compile_time_s) and duration(result.compile_time_s),
        "wall": result.wall_time_s is not None and duration(result.wall_time_s)}
    return (f"{result.model} on {result.task} L={result.seq_len}: "
            + " ".join(f"{k}={v}" for k, v in fields.items() if v))
