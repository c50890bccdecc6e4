"""Checkpoints of a training run (orbax), so a killed or interrupted run resumes where it was.

A checkpoint holds all `lra.train.loop.fit` needs to continue bit-for-bit: parameters, optimizer
state and step (the data order and dropout keys are functions of (seed, step)), the best-val
parameters so far, and a JSON record of the eval curve, the best val and the timing totals.
The PRNG key is not stored: it is rebuilt from the seed. Writes are orbax's (temporary directory,
then rename), so a kill during a save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import jax

from lra.config import experiment_keys

log = logging.getLogger(__name__)


def fingerprint(config: dict) -> str:
    """Hash of what a checkpoint's contents depend on: the config keys whose role counts for the
    fingerprint (lra.config.ROLES: task, model, seed and the optimisation part of train)."""
    keyed = experiment_keys(config, "fingerprint")
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Restored(NamedTuple):
    step: int
    arrays: dict      # {"params", "opt_state", "step", "best_params"}
    meta: dict        # {"best_val", "best_step", "curve", "train_time_s", "timed_steps", "eval_time_s"}


class CheckpointMismatch(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """No step of a checkpoint directory could be read; the message is one line naming the fix."""


def _brief(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]


class Checkpointer:
    """Every `every` steps (0: only at the end and on interrupt), keep the last `keep`."""

    def __init__(self, directory: str | Path, every: int, keep: int, fingerprint: str):
        import orbax.checkpoint as ocp  # seconds to import: only a run that checkpoints loads it

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.every = every
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, arrays: dict, meta: dict) -> None:
        """Synchronous: the training step after this one donates (invalidates) these buffers."""
        ocp = self._ocp
        if self._manager.latest_step() == step:
            return
        try:
            self._manager.save(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays),
                meta=ocp.args.JsonSave({**meta, "fingerprint": self.fingerprint})))
            self._manager.wait_until_finished()
        except Exception:
            # A save cut short (a full disk) leaves orbax's temporary step behind: remove it, so
            # the space it took can hold the run's row.
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("checkpoint: step %d -> %s", step, self.directory / str(step))

    def restore(self, template: dict) -> Restored | None:
        """The newest readable checkpoint shaped (and sharded) like `template`, or None if there
        is none. Unreadable steps (a save cut short outside orbax's rename, a corrupt file, an
        empty step directory) are moved to `<directory>-invalid/` and the next older step is
        tried; when no step is readable, CheckpointError names the directory and the fix."""
        bad: list[tuple[int, BaseException]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(step, template)
            except CheckpointMismatch:
                raise
            except Exception as err:  # noqa: BLE001 - orbax/TensorStore raise many kinds
                # The failed restore's sibling reads fail later, each logged by asyncio with its
                # whole TensorStore spec: the warning below says it once.
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                log.warning("checkpoint: step %d in %s is unreadable (%s)", step, self.directory,
                            _brief(err))
                bad.append((step, err))
                continue
            if bad:
                self._set_aside([s for s, _ in bad])
                log.warning("checkpoint: fell back to step %d; unreadable step(s) %s moved to %s",
                            step, ", ".join(str(s) for s, _ in bad), self._invalid_dir())
            log.info("checkpoint: resuming from step %d (%s)", step, self.directory / str(step))
            return restored
        if bad:
            steps = ", ".join(str(s) for s, _ in bad)
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (step(s) {steps}; newest: "
                f"{_brief(bad[0][1])}); set train.resume=false to start this run over")
        return None

    def _restore_step(self, step: int, template: dict) -> Restored:
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "curve" not in meta:
            raise ValueError(f"meta record is {type(meta).__name__} without the training record")
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} was written by a different config; "
                f"delete {self.directory} or set train.resume=false to start over")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract)))["arrays"]
        return Restored(step, arrays, meta)

    def _invalid_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + "-invalid")

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable steps out of orbax's sight (kept for inspection, never deleted), so
        the resumed run can save those step numbers again."""
        aside = self._invalid_dir()
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = aside / str(step), 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            shutil.move(str(self.directory / str(step)), target)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def clear(directory: str | Path) -> None:
    """Remove a run's checkpoints (and any set aside as unreadable): the run starts over."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(directory.with_name(directory.name + "-invalid"), ignore_errors=True)


def last_saved_step(directory: str | Path) -> int | None:
    """The newest step directory under `directory` (what a resume would try first), if any."""
    directory = Path(directory)
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()] \
        if directory.is_dir() else []
    return max(steps, default=None)
