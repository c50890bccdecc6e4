"""MQAR with every position shifted right by one: a check of why `h_transformer` recalls on MQAR.

    python examples/mqar_shifted_pairs.py task=mqar model=h_transformer \
        model.attention.block_size=8 hydra.run.dir=results/mqar_shifted/h_transformer

A random filler token goes first and the last position drops out, so the key-value pairs sit at
odd positions and straddle H-Transformer-1D's 2-token level-1 summaries (no query is lost: the
last query key can only sit at L - 2 before the shift). Measured (docs/results.md "Measured: recall and
selection at L=64"): aligned pairs 69.2%, shifted pairs 14.5% test accuracy, the 1/8 plateau
of every other attention model. The run is in-process (`fresh_process=false`): the shift is a
patch of this process's `lra.tasks.mqar.generate`, not a task option.
"""

from __future__ import annotations

import runpy
import sys

import numpy as np

import lra.tasks.mqar as mqar

unshifted = mqar.generate


def shifted(cfg, num, seed):
    data = unshifted(cfg, num, seed)
    rng = np.random.default_rng(np.append(seed, 1))  # the split's seed, one stream further
    filler_Nx1 = rng.integers(mqar.FIRST_KEY, cfg.vocab_size, (num, 1)).astype(np.int32)
    data["inputs"] = np.concatenate([filler_Nx1, data["inputs"][:, :-1]], axis=1)
    for key in ("targets", "weights"):
        data[key] = np.concatenate([np.zeros_like(data[key][:, :1]), data[key][:, :-1]], axis=1)
    assert (data["weights"].sum(axis=1) == cfg.num_pairs).all()  # every query kept
    return data


if __name__ == "__main__":
    mqar.generate = shifted
    sys.argv = ["lra.run", *sys.argv[1:], "fresh_process=false"]
    runpy.run_module("lra.run", run_name="__main__")
