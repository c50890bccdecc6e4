"""Length extrapolation: evaluate a trained model at other sequence lengths (`eval.seq_lens`).

The task is rebuilt at each length with data made for that length (`Task.config_at_length`:
ListOps with proportionally longer expressions, copy with longer strings, text truncated later),
the model is rebuilt at that length and given the trained parameters. A model whose parameters
depend on the length (learned position table, Linformer's projection) cannot run at another
length: that length gets status `error` with the reason, the run itself stays `ok`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx

log = logging.getLogger(__name__)


def length_problem(model_cfg, seq_len: int, eval_lens: list[int]) -> str | None:
    """A one-line reason the model cannot run at some of `eval_lens`, known before training."""
    other = [n for n in eval_lens if n != seq_len]
    if other and model_cfg.pos == "learned":
        return (f"model.pos=learned has a position table of {seq_len} rows and cannot run at "
                f"{', '.join(map(str, other))}: learned positions do not extrapolate; train with "
                f"model.pos=sinusoidal|rope|alibi|none to evaluate other lengths")
    return None


def _shape_mismatch(fresh: Any, trained: Any) -> list[str]:
    fresh_shapes = {jax.tree_util.keystr(p): x.shape
                    for p, x in jax.tree_util.tree_leaves_with_path(fresh)}
    trained_shapes = {jax.tree_util.keystr(p): x.shape
                      for p, x in jax.tree_util.tree_leaves_with_path(trained)}
    return [f"{k} {trained_shapes.get(k)} -> {v}" for k, v in fresh_shapes.items()
            if trained_shapes.get(k) != v]


def evaluate_lengths(task_cfg, model_cfg, train_cfg, params, seed: int,
                     seq_lens: list[int], stop=None) -> dict[str, dict]:
    """{str(L): {"status", "test_accuracy" | "error"}} for each L in `seq_lens`.

    A signal (`stop`, lra.train.Stop) raises lra.train.Interrupted."""
    from lra import models
    from lra import tasks
    from lra.train import Interrupted, evaluate, make_steps

    out: dict[str, dict] = {}
    for seq_len in seq_lens:
        try:
            problem = length_problem(model_cfg, task_cfg.seq_len, [seq_len])
            if problem:
                raise ValueError(problem)
            cfg_at = tasks.task_class(task_cfg.name).config_at_length(task_cfg, seq_len)
            task = tasks.build(cfg_at)
            task.prepare()
            model = models.build(model_cfg, task.spec, seed=seed)
            _, fresh, _ = nnx.split(model, nnx.Param, ...)
            changed = _shape_mismatch(fresh, params)
            if changed:
                raise ValueError(f"parameters depend on the length and cannot be reused at "
                                 f"{seq_len}: {'; '.join(changed[:3])}")
            steps, _ = make_steps(model, train_cfg)
            batches = task.batches("test", train_cfg.batch_size)
            metrics = evaluate(steps, params, batches, train_cfg.eval_batches, stop)
            out[str(seq_len)] = {"status": "ok", "test_accuracy": metrics["accuracy"],
                                 "test_loss": metrics["loss"]}
            log.info("eval at L=%d: test accuracy %.4f", seq_len, metrics["accuracy"])
        except Interrupted:
            raise
        except Exception as err:  # noqa: BLE001 - one length failing is a row, not a crash
            message = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            out[str(seq_len)] = {"status": "error", "error": message}
            log.warning("eval at L=%d: %s", seq_len, message)
    return out
