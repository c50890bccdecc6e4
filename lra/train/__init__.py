"""One run: build the task and model, train them in one loop, measure, checkpoint and record.

    steps.py        optimisation (lr_schedule, make_optimizer, param_groups), the loss, the pure
                    jitted train/eval steps (make_steps) and evaluate
    loop.py         fit: the loop that strings the pieces together (Loop), its Progress, due
    record.py       what a run records and returns: Chrono, Best, Record, save/restore,
                    convergence, milestones, FitResult
    ends.py         how a run ends early: RunEnded (Diverged, TimedOut, Interrupted), Stop (signals)
    experiment.py   build(task, model, seed); a result row's common fields; throughput
    checkpoint.py   Checkpointer (orbax, with a fallback) and the config fingerprint
    parallel.py     DataParallel: devices, hosts, batch placement
    extrapolate.py  evaluation at other lengths (eval.seq_lens)
    measure.py      peak memory, FLOPs, the environment
    tracking.py     TensorBoard / wandb, progress and summary lines

The package imports nothing itself: `lra.train.tracking` or `lra.train.measure` load without
JAX, so a sweep's parent process stays light. Import from the module that owns a name.
"""
