"""Self-pretraining: the phase `train.pretrain.objective=causal|masked` adds before training
(Amos, Berant & Gupta, "Never Train from Scratch: Fair Comparison of Long-Sequence Models
Requires Data-Driven Priors", ICLR 2024).

The encoder learns to predict the training split's own input tokens, labels never read:
- `masked`: a fraction `mask_rate` of each sequence's real tokens is replaced by [MASK] (one id
  past the task's vocabulary: the embedding gets one more row), and the loss is the
  cross-entropy of the original tokens at those positions (BERT's denoising; the paper's
  objective for bidirectional models). Every model supports it.
- `causal`: next-token prediction at every real position (the paper's objective for causal
  models). Only a model whose every layer runs its causal form (`bidirectional=false`, or
  `causal=true`: transformer, sparse, nsa) may take it; any other refuses at start-up in one
  line.
The output layer is the embedding itself (tied, as BERT's), so the phase adds no parameters but
[MASK]'s row. A match task's two documents are two sequences of the batch.

The phase is `lra.train.loop.fit` on a `PretrainTask` (the task's batches as per-token
problems; corruption drawn from (seed, split, step): resumable and the same on every run) and a
`LanguageModel` (the task model's encoder, shared): its own checkpoints under
<run dir>/pretrain/, its own curve (pretrain/metrics.jsonl, then result.json `pretrain`), its
val metric the token accuracy on the val split's inputs. The encoder's best-val parameters then
train with the task's head (the head starts as initialised). A fine-tuning checkpoint means the
phase is done: a resumed run goes straight on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from lra.config import PretrainConfig, TrainConfig
from lra.models.attention.base import causal_switch
from lra.models.config import layer_configs
from lra.results import Status
from lra.train.loop import fit

log = logging.getLogger(__name__)

OBJECTIVES = ("none", "causal", "masked")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MASK_STREAM = 0x5E1F  # the corruption's random stream, apart from the data order's


def enabled(cfg: TrainConfig) -> bool:
    return cfg.pretrain.objective != "none"


def extra_tokens(objective: str) -> int:
    """Embedding rows past the task's vocabulary the objective needs ([MASK] for masked)."""
    return 1 if objective == "masked" else 0


def problems(cfg) -> list[str]:
    """One line per reason a composed config cannot run its pretraining objective (start-up)."""
    objective = OmegaConf.select(cfg, "train.pretrain.objective", default="none")
    if objective not in OBJECTIVES:
        return [f"train.pretrain.objective={objective}: use one of {', '.join(OBJECTIVES)}"]
    if objective == "none":
        return []
    steps, budget = cfg.train.pretrain.steps, cfg.train.steps
    if steps >= budget:
        return [f"train.pretrain.steps={steps} leaves no step of train.steps={budget} to train "
                f"the task (pretraining takes the first steps of the budget); lower it or raise "
                f"train.steps"]
    if objective != "causal":
        return []
    model_cfg = OmegaConf.to_object(cfg.model)
    for i, attn in enumerate(layer_configs(model_cfg)):
        switch = causal_switch(attn)
        where = f"model.attention" if not model_cfg.layers else f"model.mixers.{attn.kind}"
        if switch is None:
            return [f"train.pretrain.objective=causal: {attn.kind} (layer {i}) has no causal form "
                    f"here; use train.pretrain.objective=masked"]
        field, causal_value = switch
        if getattr(attn, field) != causal_value:
            return [f"train.pretrain.objective=causal needs the causal form of {attn.kind} "
                    f"(layer {i}): set {where}.{field}={str(causal_value).lower()}, or use "
                    f"train.pretrain.objective=masked"]
    return []


def fine_tune_config(cfg: TrainConfig) -> TrainConfig:
    """The training after pretraining: the rest of train.steps (the run's budget)."""
    return dataclasses.replace(cfg, steps=cfg.steps - cfg.pretrain.steps) if enabled(cfg) else cfg


def phase_config(cfg: TrainConfig) -> TrainConfig:
    """The phase's TrainConfig: the run's optimizer and schedule over pretrain.steps (warm-up
    capped at a tenth of them), at pretrain.lr (0: train.lr), no early stop."""
    p = cfg.pretrain
    return dataclasses.replace(
        cfg, steps=p.steps, lr=p.lr or cfg.lr, warmup_steps=min(cfg.warmup_steps, p.steps // 10),
        eval_every=min(cfg.eval_every, p.steps), early_stop=False, pretrain=PretrainConfig())


class PretrainTask:
    """The phase's data: the wrapped task's batches, inputs only, as per-token problems
    {inputs, targets, weights} (weights 1 at the scored positions), eval batches keeping `valid`."""

    def __init__(self, task, objective: str, mask_rate: float, seed: int):
        self.task, self.objective, self.mask_rate, self.seed = task, objective, mask_rate, seed
        self.mask_id = task.spec.vocab_size  # the row past the task's vocabulary

    def batches(self, split: str, batch_size: int, seed: int = 0,
                start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for i, batch in enumerate(self.task.batches(split, batch_size, seed, start_step)):
            yield self.problem(batch, split, start_step + i)

    def problem(self, batch: dict, split: str, step: int) -> dict[str, np.ndarray]:
        if "inputs1" in batch:  # a match task: both documents, as rows of one batch
            inputs = np.concatenate([batch["inputs1"], batch["inputs2"]])
            valid = np.concatenate([batch["valid"]] * 2) if "valid" in batch else None
        else:
            inputs, valid = batch["inputs"], batch.get("valid")
        inputs = np.asarray(inputs, np.int32)
        if self.objective == "causal":
            targets = np.zeros_like(inputs)
            targets[:, :-1] = inputs[:, 1:]
            weights = (targets != 0) & (inputs != 0)
        else:
            rng = np.random.default_rng([self.seed, MASK_STREAM, SPLIT_IDS.get(split, 3), step])
            weights = (inputs != 0) & (rng.random(inputs.shape) < self.mask_rate)
            targets = inputs
            inputs = np.where(weights, self.mask_id, inputs).astype(np.int32)
        out = {"inputs": inputs, "targets": targets, "weights": weights.astype(np.float32)}
        if valid is not None:
            out["valid"] = valid
        return out


class LanguageModel(nnx.Module):
    """The task model's encoder (the same module: its parameters are the model's) with the
    embedding as output layer: logits over the vocabulary at every position."""

    def __init__(self, encoder: nnx.Module):
        self.encoder = encoder

    def __call__(self, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        hidden_BxLxE, _ = self.encoder(batch["inputs"], rng)
        return self.encoder.embed.attend(hidden_BxLxE)


def run(model, task, cfg: TrainConfig, seed: int, checkpointer, stop, on_log):
    """Pretrain `model`'s encoder in place (its best-val parameters); the phase's FitResult and
    its wall seconds."""
    started = time.perf_counter()
    lm = LanguageModel(model.encoder)
    p = cfg.pretrain
    log.info("self-pretraining (%s) on the training inputs: the first %d of train.steps=%d, "
             "then the task", p.objective, p.steps, cfg.steps)
    fitted = fit(lm, PretrainTask(task, p.objective, p.mask_rate, seed), phase_config(cfg), seed,
                 on_log=on_log, checkpointer=checkpointer, stop=stop)
    if fitted.status == Status.OK and fitted.params is not None:
        nnx.update(lm, fitted.params)
        log.info("self-pretraining done: val token accuracy %.4f at step %s; training the task "
                 "from its encoder", fitted.val_accuracy, fitted.best_step)
    return fitted, time.perf_counter() - started


def record(fitted, cfg: TrainConfig, wall_time_s: float) -> dict:
    """result.json's `pretrain`: the objective and its settings, how the phase ended, its
    token accuracies (val: best; test: at the best val), times and curve."""
    p = cfg.pretrain
    return {"objective": p.objective, "steps": p.steps, "lr": p.lr or cfg.lr,
            "mask_rate": p.mask_rate if p.objective == "masked" else None,
            "status": Status(fitted.status).value, "steps_done": fitted.steps,
            "val_token_accuracy": fitted.val_accuracy, "test_token_accuracy": fitted.test_accuracy,
            "best_step": fitted.best_step, "train_loss": fitted.train_loss,
            "compile_time_s": fitted.compile_time_s, "train_time_s": fitted.train_time_s,
            "steps_per_s": fitted.steps_per_s, "eval_time_s": fitted.eval_time_s,
            "wall_time_s": wall_time_s, "resumed_from_step": fitted.resumed_from_step,
            "curve": fitted.curve}
