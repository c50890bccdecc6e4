"""One experiment's pieces, built one way for lra.run, lra.bench and length extrapolation: its
result row (`new_result`), its task and model (`build`) and its throughput fields."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from lra import models, tasks
from lra.config import row_fingerprint
from lra.models.config import display_name
from lra.results import RunResult


def new_result(cfg: DictConfig, **fields) -> RunResult:
    """An empty RunResult naming this run (task, model, length, seed, preset, config); `fields`
    set or override any field."""
    config = OmegaConf.to_container(cfg, resolve=True)
    named = dict(task=cfg.task.name, model=display_name(cfg.model), seq_len=cfg.task.seq_len,
                 seed=cfg.seed, preset=cfg.preset, batch_size=cfg.train.batch_size,
                 config=config, fingerprint=row_fingerprint(config))
    return RunResult(**{**named, **fields})


def build(task_cfg, model_cfg, seed: int, seq_len: int | None = None,
          load: tuple[str, ...] | None = ("train", "val", "test"), extra_tokens: int = 0):
    """(task, model) of typed task and model configs. `seq_len`: the task as made for that
    length (Task.config_at_length). The data is prepared and the `load` splits read into memory
    (before a memory baseline is taken); `load=None`: neither, the spec alone (a benchmark on
    synthetic batches). `extra_tokens`: embedding rows past the task's vocabulary (self-
    pretraining's [MASK], lra.train.pretrain.extra_tokens)."""
    if seq_len is not None and seq_len != task_cfg.seq_len:
        task_cfg = tasks.task_class(task_cfg.name).config_at_length(task_cfg, seq_len)
    task = tasks.build(task_cfg)
    if load is not None:
        task.prepare()
        for split in load:
            task.split(split)
    spec = dataclasses.replace(task.spec, vocab_size=task.spec.vocab_size + extra_tokens) \
        if extra_tokens else task.spec
    return task, models.build(model_cfg, spec, seed=seed)


def counts(result: RunResult, model, model_cfg, spec) -> None:
    """Fill the parameter count and the ratio to the Transformer of the same dims."""
    result.param_count = models.param_count(model)
    result.param_ratio = models.param_ratio(model, model_cfg, spec)


def throughput(steps_per_s: float | None, batch_size: int, seq_len: int) -> dict:
    """steps/s, examples/s and tokens/s of one rate (all None without one)."""
    if not steps_per_s:
        return {"steps_per_s": None, "examples_per_s": None, "tokens_per_s": None}
    return {"steps_per_s": steps_per_s, "examples_per_s": steps_per_s * batch_size,
            "tokens_per_s": steps_per_s * batch_size * seq_len}


def typed(cfg: DictConfig, *keys: str) -> list:
    """The typed dataclass objects of `cfg`'s sections (e.g. "task", "model", "train")."""
    return [OmegaConf.to_object(cfg[key]) for key in keys]

