"""What the SSM parameter group protects: a tiny LRU trained with LRA text's paper optimizer.

    python examples/ssm_param_groups.py --steps 1000      # ~1 min on 2 CPU cores

Trains the same tiny LRU classifier (random tokens and labels: the point is what the optimizer
does to the recurrence, not accuracy) twice with lr 0.05, rsqrt schedule, warm-up 8000, weight
decay 0.1 (configs/task_preset/text/paper.yaml): once as the harness does (nu, theta, gamma in
their own group: peak `train.ssm_lr`, no decay) and once with every parameter in one AdamW group,
as before the groups existed. Prints the largest and median |lambda| of the first layer.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lra import models
from lra.config import TrainConfig
from lra.train.steps import make_optimizer, param_groups
from lra.models.attention.lru import LRUConfig
from lra.models.config import ModelConfig

SPEC = type("Spec", (), dict(vocab_size=32, num_classes=2, seq_len=128, kind="classify",
                             default_pool="mean"))()
TEXT_PAPER = dataclasses.replace(TrainConfig(), lr=0.05, schedule="rsqrt", warmup_steps=8000,
                                 weight_decay=0.1)


def lambdas(model) -> np.ndarray:
    return np.abs(np.asarray(model.encoder.blocks[0].attention.attn.lam()))


def train(steps: int, grouped: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    cfg = ModelConfig(emb_dim=32, num_heads=2, num_layers=1, mlp_dim=32, dropout=0.0, pos="none",
                      attention=LRUConfig(state_dim=16))
    model = models.build(cfg, SPEC, seed=seed)
    before = lambdas(model)
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(TEXT_PAPER, param_groups(params) if grouped else None)

    def loss(p, batch):
        logits = nnx.merge(graphdef, p, others)(batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    @jax.jit
    def step(p, opt, i):
        key = jax.random.fold_in(jax.random.key(seed), i)
        batch = {"inputs": jax.random.randint(key, (16, SPEC.seq_len), 1, SPEC.vocab_size),
                 "targets": jax.random.randint(jax.random.fold_in(key, 1), (16,), 0, 2)}
        grads = jax.grad(loss)(p, batch)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    for i in range(steps):
        params, opt = step(params, opt, jnp.asarray(i))
    return before, lambdas(nnx.merge(graphdef, params, others))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print(f"tiny LRU, {args.steps} steps of lr 0.05 rsqrt (warm-up 8000), weight decay 0.1")
    print("| optimizer | max abs(lambda) before -> after | median before -> after |")
    print("|---|---|---|")
    for grouped, name in ((True, "SSM group (train.ssm_lr, no decay)"),
                          (False, "one AdamW group (no parameter groups)")):
        before, after = train(args.steps, grouped)
        print(f"| {name} | {before.max():.4f} -> {after.max():.4f} | "
              f"{np.median(before):.4f} -> {np.median(after):.4f} |")


if __name__ == "__main__":
    main()
