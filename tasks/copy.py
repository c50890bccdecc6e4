"""Synthetic copying (kind=tokens): copy, reverse, selective copy and induction heads (the last
two as in the Mamba paper, Gu & Dao 2023).

One example of length `seq_len`, with n = `num_tokens` content symbols x_1..x_n:

    copy:      x_1 .. x_n  DELIM  BLANK*n  PAD*   targets x_1 .. x_n on the BLANK positions
    reverse:   x_1 .. x_n  DELIM  BLANK*n  PAD*   targets x_n .. x_1
    selective: NOISE* with x_1 .. x_n scattered in order over a prefix of length
               seq_len - 1 - n, then DELIM  BLANK*n      targets x_1 .. x_n
    induction: s_1 .. s_{L-2} random symbols with one DELIM (the trigger) at a random position
               p <= L - 4, then DELIM BLANK              target s_{p+1} (the token after the
               trigger) on the BLANK; n = 1

The encoder is bidirectional, so the answer positions hold a BLANK placeholder, never the answer.
Only the n answer positions carry weight 1 (accuracy is per token over them).

Token ids: 0 PAD, 1 BLANK, 2 DELIM, 3 NOISE, 4 .. 3 + num_symbols content. Targets are token ids
(num_classes = vocab_size). Data is generated in memory from `data_seed` (vectorised numpy, well
under a second for the default sizes), so nothing is cached on disk; the split index is part of
the seed, so train/val/test are independent draws.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lra.tasks.base import (ArrayTask, TaskConfig, TaskSpec, atomic_file, data_field, data_params,
                            generated_dir, register_task, split_seed)

PAD_ID, BLANK_ID, DELIM_ID, NOISE_ID = 0, 1, 2, 3
FIRST_SYMBOL = 4
VARIANTS = ("copy", "reverse", "selective", "induction")
SELECTIVE_TOKENS = 16  # Mamba's selective copying memorises 16 tokens


@dataclasses.dataclass
class CopyConfig(TaskConfig):
    name: str = "copy"
    # data_field: the generated data depends on it (cache key; num_tokens enters resolved).
    seq_len: int = data_field(512)
    variant: str = data_field("copy")    # copy | reverse | selective | induction
    num_tokens: int = data_field(0)      # n; 0 = auto: (seq_len-1)//2, selective: min(16, that),
                                         # induction: 1 (the only choice)
    num_symbols: int = data_field(16)    # content alphabet size (Mamba's selective copying: 16)
    num_train: int = data_field(10000)
    num_val: int = data_field(1000)
    num_test: int = data_field(1000)
    data_seed: int = data_field(0)       # generator seed (independent of the training seed)
    # Train batches drawn afresh every step from a seeded stream (ArrayTask.stream): no example
    # repeats, so a model cannot memorise its way to the answer; num_train is then unused.
    fresh_train: bool = data_field(False)


def resolve_num_tokens(cfg: CopyConfig) -> int:
    """n for this config; raises ValueError with the fix when it cannot fit in seq_len."""
    if cfg.variant not in VARIANTS:
        raise ValueError(f"task.variant={cfg.variant!r}; use one of {', '.join(VARIANTS)}")
    if cfg.num_symbols < 1:
        raise ValueError(f"task.num_symbols must be >= 1 (got {cfg.num_symbols})")
    if cfg.variant == "induction":
        if cfg.num_tokens not in (0, 1) or cfg.seq_len < 4:
            raise ValueError(f"task.variant=induction recalls one token and needs task.seq_len "
                             f">= 4 (got num_tokens={cfg.num_tokens}, seq_len={cfg.seq_len}); "
                             f"set task.num_tokens=0")
        return 1
    most = (cfg.seq_len - 1) // 2  # prefix >= n, plus the delimiter, plus n answers
    n = cfg.num_tokens or (min(SELECTIVE_TOKENS, most) if cfg.variant == "selective" else most)
    if n < 1 or n > most:
        raise ValueError(f"copy needs 1 <= task.num_tokens <= (task.seq_len-1)//2 = {most} "
                         f"(got {n} at task.seq_len={cfg.seq_len}); lower task.num_tokens "
                         f"(0 = auto) or raise task.seq_len")
    return n


def generate(cfg: CopyConfig, num: int, seed) -> dict[str, np.ndarray]:
    """`num` examples as {"inputs", "targets", "weights"} of shape [num, seq_len]."""
    n = resolve_num_tokens(cfg)
    length = cfg.seq_len
    rng = np.random.default_rng(seed)
    if cfg.variant == "induction":
        return induction(cfg, num, rng)
    content = (rng.integers(0, cfg.num_symbols, (num, n)) + FIRST_SYMBOL).astype(np.int32)
    prefix = length - 1 - n if cfg.variant == "selective" else n
    inputs = np.zeros((num, length), np.int32)
    targets = np.zeros((num, length), np.int32)
    weights = np.zeros((num, length), np.float32)
    if cfg.variant == "selective":
        # n distinct prefix positions per row, in increasing order; the rest is noise.
        where = np.sort(np.argsort(rng.random((num, prefix)), axis=1)[:, :n], axis=1)
        inputs[:, :prefix] = NOISE_ID
        np.put_along_axis(inputs, where, content, axis=1)
    else:
        inputs[:, :n] = content
    answer = slice(prefix + 1, prefix + 1 + n)
    inputs[:, prefix] = DELIM_ID
    inputs[:, answer] = BLANK_ID
    targets[:, answer] = content[:, ::-1] if cfg.variant == "reverse" else content
    weights[:, answer] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def induction(cfg: CopyConfig, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Induction heads: the token after the trigger's first occurrence, asked for by the trigger
    at the end (the trigger occurs exactly twice; the symbols never equal it)."""
    length = cfg.seq_len
    rows = np.arange(num)
    inputs = (rng.integers(0, cfg.num_symbols, (num, length)) + FIRST_SYMBOL).astype(np.int32)
    trigger = rng.integers(0, length - 3, num)  # p in [0, L-4]: its successor precedes the end
    inputs[rows, trigger] = DELIM_ID
    inputs[:, length - 2], inputs[:, length - 1] = DELIM_ID, BLANK_ID
    targets = np.zeros((num, length), np.int32)
    weights = np.zeros((num, length), np.float32)
    targets[:, length - 1] = inputs[rows, trigger + 1]
    weights[:, length - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


@register_task(CopyConfig)
class Copy(ArrayTask):
    cfg: CopyConfig

    @classmethod
    def config_at_length(cls, cfg: CopyConfig, seq_len: int) -> CopyConfig:
        """Longer strings at a longer length: n = auto follows seq_len, a set n is scaled."""
        n = cfg.num_tokens and max(1, round(cfg.num_tokens * seq_len / cfg.seq_len))
        return dataclasses.replace(cfg, seq_len=seq_len, num_tokens=n, num_train=1)

    @classmethod
    def chance_accuracy(cls, cfg: CopyConfig) -> float:
        """Every scored target is a content symbol: uniform guessing over num_symbols."""
        return 1.0 / cfg.num_symbols

    @property
    def spec(self) -> TaskSpec:
        vocab = FIRST_SYMBOL + self.cfg.num_symbols
        return TaskSpec(self.cfg.name, vocab_size=vocab, num_classes=vocab,
                        seq_len=self.cfg.seq_len, kind="tokens",
                        default_pool="mean")  # pool unused by the per-token head

    def prepare(self) -> Path:
        """Checks the config; writes only a small params.json (the data lives in memory)."""
        num_tokens = resolve_num_tokens(self.cfg)
        directory = generated_dir(self.cfg, num_tokens=num_tokens)
        path = directory / "params.json"
        if not path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            params = data_params(self.cfg, num_tokens=num_tokens)
            with atomic_file(path) as f:
                f.write(json.dumps(params, indent=1, sort_keys=True) + "\n")
        return directory

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        return self.generate(getattr(self.cfg, f"num_{split}"), split_seed(self.cfg.data_seed, split))

    def generate(self, num: int, seed) -> dict[str, np.ndarray]:
        return generate(self.cfg, num, seed)
