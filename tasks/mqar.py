"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: Measuring and Improving
Recall in Efficient Language Models"), kind=tokens.

One example of length `seq_len` with D = `num_pairs` key-value pairs:

    k_1 v_1 k_2 v_2 .. k_D v_D | filler .. k_a BLANK .. filler .. k_b BLANK .. filler
                                                (scored at k_a -> v_a, at k_b -> v_b)

The D keys are distinct, drawn from the key half of the vocabulary, their values (repeats
allowed) from the value half. Every key is then queried once, in random order: the key again,
scored at its own position with that key's value as target (as in Zoology, where a causal
language model predicts the value from the query key's position). This harness's encoders are
bidirectional, so the position after a query key holds BLANK: the answer never appears in the
input. Query slots are the 2-position slots after the pairs; slot j (counted from the end of the
pairs) is chosen with probability proportional to (j + 1)^(a - 1) (Zoology's power law, a =
`power_a` = 0.01: recall mostly at short distances, with a long tail), D slots without
replacement. Other positions hold random non-special tokens (`random_non_queries`, Zoology's
default) or BLANK. Only the D query-key positions carry weight 1: accuracy is per token over the
queries.

Token ids: 0 PAD, 1 BLANK, 2 .. 1 + K keys, 2 + K .. vocab_size - 1 values, K = (vocab_size -
2) // 2. Targets are token ids (num_classes = vocab_size). Generated in memory from `data_seed`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lra.tasks.base import (ArrayTask, TaskConfig, TaskSpec, atomic_file, data_field, data_params,
                            generated_dir, register_task, split_seed)

PAD_ID, BLANK_ID, FIRST_KEY = 0, 1, 2


@dataclasses.dataclass
class MQARConfig(TaskConfig):
    name: str = "mqar"
    seq_len: int = data_field(128)
    vocab_size: int = data_field(256)     # Zoology: 8192; keys and values split it in halves
    num_pairs: int = data_field(8)        # D (Zoology's num_kv_pairs: 4 .. 64)
    power_a: float = data_field(0.01)     # query-slot power law (Zoology's power_a)
    random_non_queries: bool = data_field(True)
    num_train: int = data_field(10000)
    num_val: int = data_field(1000)
    num_test: int = data_field(1000)
    data_seed: int = data_field(0)
    # Train batches drawn afresh every step from a seeded stream (ArrayTask.stream): no example
    # repeats, so a model cannot memorise its way to the answer; num_train is then unused.
    fresh_train: bool = data_field(False)


def check(cfg: MQARConfig) -> None:
    """ValueError naming the fix when the pairs, their queries or the vocabulary do not fit."""
    keys = (cfg.vocab_size - 2) // 2
    if cfg.num_pairs < 1 or keys < cfg.num_pairs:
        raise ValueError(f"mqar needs 1 <= task.num_pairs <= (task.vocab_size - 2) // 2 = {keys} "
                         f"distinct keys (got num_pairs={cfg.num_pairs}); raise task.vocab_size")
    need = 4 * cfg.num_pairs
    if cfg.seq_len < need:
        raise ValueError(f"mqar with task.num_pairs={cfg.num_pairs} needs task.seq_len >= "
                         f"{need} (the pairs, then a query key + BLANK per query); got "
                         f"{cfg.seq_len}: raise task.seq_len or lower task.num_pairs")
    if not 0 < cfg.power_a <= 1:
        raise ValueError(f"task.power_a={cfg.power_a} must be in (0, 1] (Zoology: 0.01)")


def generate(cfg: MQARConfig, num: int, seed) -> dict[str, np.ndarray]:
    """`num` examples as {"inputs", "targets", "weights"} of shape [num, seq_len]."""
    check(cfg)
    d, length = cfg.num_pairs, cfg.seq_len
    num_keys = (cfg.vocab_size - 2) // 2
    rng = np.random.default_rng(seed)
    rows = np.arange(num)[:, None]
    # D distinct keys per row (the first D of a random permutation), values with repeats.
    keys = np.argsort(rng.random((num, num_keys)), axis=1)[:, :d] + FIRST_KEY
    values = rng.integers(FIRST_KEY + num_keys, cfg.vocab_size, (num, d))
    if cfg.random_non_queries:
        inputs = rng.integers(FIRST_KEY, cfg.vocab_size, (num, length))
    else:
        inputs = np.full((num, length), BLANK_ID)
    inputs[:, 0:2 * d:2], inputs[:, 1:2 * d:2] = keys, values
    # D of the query slots, power law in the slot index (Gumbel top-k: without replacement).
    slots = (length - 2 * d) // 2
    log_p = (cfg.power_a - 1.0) * np.log(np.arange(1, slots + 1))
    chosen = np.argsort(-(log_p + rng.gumbel(size=(num, slots))), axis=1)[:, :d]
    order = np.argsort(rng.random((num, d)), axis=1)  # which pair each chosen slot asks for
    at = 2 * d + 2 * chosen  # the query key's position, scored; BLANK after it
    inputs[rows, at] = keys[rows, order]
    inputs[rows, at + 1] = BLANK_ID
    targets = np.zeros((num, length), np.int32)
    weights = np.zeros((num, length), np.float32)
    targets[rows, at] = values[rows, order]
    weights[rows, at] = 1.0
    return {"inputs": inputs.astype(np.int32), "targets": targets, "weights": weights}


@register_task(MQARConfig)
class MQAR(ArrayTask):
    cfg: MQARConfig
    kind = "tokens"
    default_pool = "mean"  # unused by the per-token head

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.cfg.name, vocab_size=self.cfg.vocab_size,
                        num_classes=self.cfg.vocab_size, seq_len=self.cfg.seq_len,
                        kind=self.kind, default_pool=self.default_pool)

    @classmethod
    def config_at_length(cls, cfg: MQARConfig, seq_len: int) -> MQARConfig:
        """The same pairs at another length: the queries spread over the longer tail."""
        return dataclasses.replace(cfg, seq_len=seq_len, num_train=1)

    @classmethod
    def chance_accuracy(cls, cfg: MQARConfig) -> float:
        """Every scored target is a value token: uniform guessing over the value half."""
        num_keys = (cfg.vocab_size - 2) // 2
        return 1.0 / (cfg.vocab_size - 2 - num_keys)

    def prepare(self) -> Path:
        """Checks the config; writes only a small params.json (the data lives in memory)."""
        check(self.cfg)
        directory = generated_dir(self.cfg)
        path = directory / "params.json"
        if not path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                f.write(json.dumps(data_params(self.cfg), indent=1, sort_keys=True) + "\n")
        return directory

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        return self.generate(getattr(self.cfg, f"num_{split}"), split_seed(self.cfg.data_seed, split))

    def generate(self, num: int, seed) -> dict[str, np.ndarray]:
        return generate(self.cfg, num, seed)
