"""Checkpoints of a training run (orbax), so a killed or interrupted run resumes where it was.

A checkpoint holds everything `lra.train.fit` needs to continue bit-for-bit: parameters, optimizer
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
from typing import Any, NamedTuple

import jax

log = logging.getLogger(__name__)

# Train fields that change how a run is observed, not what it computes: a resume may change them.
BOOKKEEPING = ("progress", "max_time_s", "checkpoint_every", "keep_checkpoints", "resume",
               "log_every", "timing_warmup_steps", "data_parallel", "eval_batches")


def fingerprint(config: dict) -> str:
    """Hash of what a checkpoint's contents depend on (task, model, seed, optimisation)."""
    train = {k: v for k, v in config.get("train", {}).items() if k not in BOOKKEEPING}
    keyed = {"task": config.get("task"), "model": config.get("model"), "seed": config.get("seed"),
             "train": train}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Restored(NamedTuple):
    step: int
    arrays: dict      # {"params", "opt_state", "step", "best_params"}
    meta: dict        # {"best_val", "best_step", "curve", "train_time_s", "timed_steps", "eval_time_s"}


class CheckpointMismatch(RuntimeError):
    pass


class Checkpointer:
    """Every `every` steps (0: only at the end and on interrupt), keep the last `keep`."""

    def __init__(self, directory: str | Path, every: int, keep: int, fingerprint: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.every = every
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, arrays: dict, meta: dict) -> None:
        """Synchronous: the training step after this one donates (invalidates) these buffers."""
        ocp = self._ocp
        if self._manager.latest_step() == step:
            return
        self._manager.save(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave({**meta, "fingerprint": self.fingerprint})))
        self._manager.wait_until_finished()
        log.info("checkpoint: step %d -> %s", step, self.directory / str(step))

    def restore(self, template: dict) -> Restored | None:
        """The latest checkpoint shaped (and sharded) like `template`, or None if there is none."""
        ocp = self._ocp
        step = self._manager.latest_step()
        if step is None:
            return None
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} was written by a different config; "
                f"delete {self.directory} or set train.resume=false to start over")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract)))["arrays"]
        log.info("checkpoint: resuming from step %d (%s)", step, self.directory / str(step))
        return Restored(step, arrays, meta)

    def close(self) -> None:
        self._manager.close()


def clear(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def to_template(params: Any, opt_state: Any, step: Any) -> dict:
    return {"params": params, "opt_state": opt_state, "step": step, "best_params": params}
