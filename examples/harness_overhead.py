"""What the training harness costs per step: `lra.train.loop.fit` against a bare loop of the same
compiled train step on the same batches.

    python examples/harness_overhead.py [--model transformer] [--task listops] [--steps 300]
                                        [--repeats 3] [overrides ...]

Both sides run in this process, interleaved (fit, bare, fit, bare, ...) so machine noise hits
both alike. The bare loop is `state = step(state, next(batches))` with one sync at the end: the
fastest Python can drive the step. fit's rate is its own steady-state `timed_steps /
train_time_s` (evaluations, logging and checkpoints excluded, as in result.json); the bare
loop's is steps / elapsed. Prints the median of each and their ratio (>= 0.97 is the goal).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--task", default="listops")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from lra import cli, models, tasks
    from lra.config import CONFIG_DIR
    from lra.train.loop import fit
    from lra.train.steps import make_steps

    cli.setup()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", f"task={args.task}", f"preset={args.preset}",
            f"train.steps={args.steps}", f"train.eval_every={args.steps}", "train.progress=false",
            "train.checkpoint_every=-1", *args.overrides])
    task = tasks.build(OmegaConf.to_object(cfg.task))
    task.prepare()
    train_cfg = OmegaConf.to_object(cfg.train)
    model_cfg = OmegaConf.to_object(cfg.model)

    def harness() -> float:
        model = models.build(model_cfg, task.spec, seed=cfg.seed)
        result = fit(model, task, train_cfg, cfg.seed)
        return result.timed_steps / result.train_time_s

    def bare() -> float:
        model = models.build(model_cfg, task.spec, seed=cfg.seed)
        steps = make_steps(model, train_cfg)
        steps = steps if hasattr(steps, "train") else steps[0]
        state = steps.init(jax.random.key(cfg.seed))
        batches = task.batches("train", train_cfg.batch_size, cfg.seed)
        batch = next(batches)
        compiled = steps.train.lower(state, batch).compile()
        warm = max(train_cfg.timing_warmup_steps, 1)
        for _ in range(warm):
            state, _ = compiled(state, next(batches))
        jax.block_until_ready(state)
        clock = time.perf_counter()
        for _ in range(args.steps - warm):
            state, metrics = compiled(state, next(batches))
        jax.block_until_ready(state)
        return (args.steps - warm) / (time.perf_counter() - clock)

    rates: dict[str, list[float]] = {"fit": [], "bare": []}
    for _ in range(args.repeats):
        rates["fit"].append(harness())
        rates["bare"].append(bare())
    fit_rate, bare_rate = statistics.median(rates["fit"]), statistics.median(rates["bare"])
    print(f"{args.model} on {args.task} ({args.preset}), {args.steps} steps x {args.repeats}")
    print(f"  fit : {fit_rate:8.2f} steps/s  {[round(r, 2) for r in rates['fit']]}")
    print(f"  bare: {bare_rate:8.2f} steps/s  {[round(r, 2) for r in rates['bare']]}")
    print(f"  harness / bare = {fit_rate / bare_rate:.3f}x")


if __name__ == "__main__":
    main()
