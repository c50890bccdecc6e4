"""Length extrapolation: evaluate a trained model at other sequence lengths (`eval.seq_lens`).

The task is rebuilt at each length with data made for that length (`Task.config_at_length`:
ListOps with proportionally longer expressions, copy with longer strings, text truncated later),
the model is rebuilt at that length (lra.train.experiment.build, as in training) and given
the trained parameters. A model with parameters sized by the length (a learned position table,
Linformer's projection) cannot run at another length: that length gets status `error` with the reason, the
run itself stays `ok`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx

from lra import models
from lra.train import pretrain
from lra.train.ends import Interrupted
from lra.train.experiment import build
from lra.train.steps import evaluate, make_steps

log = logging.getLogger(__name__)


def _param_shapes(params: Any) -> dict[str, tuple]:
    """{"encoder.pos_embed.embedding": shape, ...} of a parameter tree."""
    def name(path) -> str:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)

    return {name(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _changed(shapes: dict[str, tuple], other: dict[str, tuple]) -> list[str]:
    return [f"{k} {shapes.get(k)} -> {v}" for k, v in other.items() if shapes.get(k) != v]


def _abstract_params(model_cfg, spec) -> Any:
    """The model's parameter shapes at `spec` (nothing is allocated)."""
    model = nnx.eval_shape(lambda: models.build(model_cfg, spec))
    return nnx.state(model, nnx.Param)


def length_problem(model_cfg, spec, eval_lens: list[int]) -> str | None:
    """A one-line reason the model cannot run at some of `eval_lens`, known before training:
    parameters whose shape depends on the length (found by building the model abstractly at
    each length and comparing parameter shapes)."""
    other = [n for n in eval_lens if n != spec.seq_len]
    if not other:
        return None
    trained = _param_shapes(_abstract_params(model_cfg, spec))
    for seq_len in other:
        changed = _changed(trained, _param_shapes(_abstract_params(
            model_cfg, dataclasses.replace(spec, seq_len=seq_len))))
        if changed:
            return refusal(changed, seq_len)
    return None


def refusal(changed: list[str], seq_len: int) -> str:
    return (f"parameters sized by the length ({'; '.join(changed[:2])}) cannot run at "
            f"L={seq_len}: train a model whose parameters do not depend on the length (e.g. "
            f"model.pos=sinusoidal|rope|alibi|none instead of learned) to evaluate other lengths")


def evaluate_lengths(task_cfg, model_cfg, train_cfg, params, seed: int,
                     seq_lens: list[int], stop=None) -> dict[str, dict]:
    """{str(L): {"status", "test_accuracy" | "error"}} for each L in `seq_lens`.

    A signal (`stop`, lra.train.ends.Stop) raises lra.train.ends.Interrupted."""
    out: dict[str, dict] = {}
    for seq_len in seq_lens:
        try:
            task, model = build(task_cfg, model_cfg, seed, seq_len=seq_len, load=(),
                                extra_tokens=pretrain.extra_tokens(train_cfg.pretrain.objective))
            changed = _changed(_param_shapes(params), _param_shapes(nnx.state(model, nnx.Param)))
            if changed:
                raise ValueError(refusal(changed, seq_len))
            metrics = evaluate(make_steps(model, train_cfg), params,
                               task.batches("test", train_cfg.batch_size), train_cfg.eval_batches,
                               stop)
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
