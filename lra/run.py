"""python -m lra.run model=<name> task=<name> [preset=...]: train, evaluate, write result.json."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lra import cli
from lra.measure import PeakMemory, compiled_stats, environment
from lra.results import RunResult, atomic_write, write_result

cli.setup()
logger = logging.getLogger(__name__)


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def execute(cfg: DictConfig, out_dir: Path, stop=None) -> RunResult:
    """Build task and model, train, and return the filled RunResult (never raises).

    With train.checkpoint_every >= 0 the run checkpoints under out_dir/checkpoints and, when
    train.resume and no finished result is there, continues from the latest checkpoint.
    """
    import models
    import tasks
    from lra import checkpoint
    from lra.train import fit

    started = time.perf_counter()
    result = RunResult(task=cfg.task.name, model=cfg.model.name, seq_len=cfg.task.seq_len,
                       seed=cfg.seed, preset=cfg.preset, batch_size=cfg.train.batch_size,
                       config=OmegaConf.to_container(cfg, resolve=True), env=environment())

    def log(curve: list[dict]) -> None:
        atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in curve))

    try:
        task = tasks.build(OmegaConf.to_object(cfg.task))
        task.prepare()
        for split in ("train", "val", "test"):
            task.split(split)  # load before the memory baseline
        model = models.build(OmegaConf.to_object(cfg.model), task.spec, seed=cfg.seed)
        if cfg.eval.seq_lens:
            from lra.extrapolate import length_problem

            problem = length_problem(cfg.model, cfg.task.seq_len, list(cfg.eval.seq_lens))
            if problem:
                logger.warning(problem)
        result.param_count = models.param_count(model)
        memory = PeakMemory()
        checkpointer = None
        ckpt_dir = out_dir / "checkpoints"
        if not cfg.train.resume or finished_result(out_dir):
            checkpoint.clear(ckpt_dir)  # a rerun of a finished run starts over
        if cfg.train.checkpoint_every >= 0:
            checkpointer = checkpoint.Checkpointer(
                ckpt_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints,
                checkpoint.fingerprint(result.config))
        try:
            fitted = fit(model, task, OmegaConf.to_object(cfg.train), cfg.seed, on_log=log,
                         memory=memory, checkpointer=checkpointer, stop=stop)
        finally:
            if checkpointer is not None:
                checkpointer.close()
        result.num_devices, result.resumed_from_step = fitted.num_devices, fitted.resumed_from_step
        if cfg.eval.seq_lens and fitted.params is not None and fitted.status in ("ok", "timeout"):
            from lra.extrapolate import evaluate_lengths

            result.eval_lengths = evaluate_lengths(
                OmegaConf.to_object(cfg.task), OmegaConf.to_object(cfg.model),
                OmegaConf.to_object(cfg.train), fitted.params, cfg.seed, list(cfg.eval.seq_lens))
        result.peak_memory_bytes = memory.read()
        result.memory_source = memory.source
        result.__dict__.update(compiled_stats(fitted.compiled))
        result.status = fitted.status
        result.steps = fitted.steps
        result.val_accuracy, result.test_accuracy = fitted.val_accuracy, fitted.test_accuracy
        result.best_step = fitted.best_step
        result.train_loss, result.train_accuracy = fitted.train_loss, fitted.train_accuracy
        result.compile_time_s, result.eval_time_s = fitted.compile_time_s, fitted.eval_time_s
        result.lower_time_s = fitted.lower_time_s
        result.train_time_s = fitted.train_time_s
        if fitted.train_time_s > 0:
            rate = fitted.timed_steps / fitted.train_time_s
            result.steps_per_s = rate
            result.examples_per_s = rate * cfg.train.batch_size
            result.tokens_per_s = rate * cfg.train.batch_size * cfg.task.seq_len
    except Exception as err:  # noqa: BLE001 - failure is data: it becomes the row's status
        result.status = "oom" if _is_oom(err) else "error"
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:2000]}"
        (out_dir / "traceback.txt").write_text(traceback.format_exc())
    result.wall_time_s = time.perf_counter() - started
    return result


def finished_result(out_dir: Path) -> str | None:
    """Status of a readable result.json in `out_dir` that needs no rerun (errors are rerun)."""
    try:
        status = json.loads((out_dir / "result.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if status in ("ok", "oom", "diverged", "timeout") else None


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    done = finished_result(out_dir)
    if cfg.skip_done and done:
        print(f"skipped: {out_dir} already has a result with status {done!r} (skip_done=false reruns it)")
        print((out_dir / "result.json").resolve())
        return
    cli.job_setup(cfg)
    from lra.train import Stop

    with Stop() as stop:
        result = execute(cfg, out_dir, stop)
        path = write_result(result, out_dir)
    summary = (f"{result.model} on {result.task} L={result.seq_len}: status={result.status} "
               f"test_acc={result.test_accuracy} steps/s={result.steps_per_s} "
               f"peak_mem={result.peak_memory_bytes} ({result.memory_source})")
    print(summary)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(path.resolve())
    if result.status == "interrupted":
        # A sweep stops here too; re-running the same command resumes from the checkpoint.
        print(f"interrupted by signal {stop.signum}: checkpoint in {out_dir / 'checkpoints'}; "
              f"re-run the same command to resume", file=sys.stderr)
        raise SystemExit(128 + stop.signum)
    if result.status == "error" and hydra_cfg.mode == RunMode.RUN:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.check_overrides(sys.argv[1:])
    main()
