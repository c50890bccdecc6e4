"""Many runs: the points of a sweep, each in a worker process.

    executor.py   Executor / Sweep / Job: the workers (reused or fresh per point), the one
                  timeout rule, the one signal rule, a dead point's row; its doc lists what it
                  guarantees
    pool.py       Hydra's launcher over the executor (hydra/launcher=pool, the default)
    launch.py     how a point ended: the failure classifier (settle, death_status,
                  exception_status) and what a point does when it starts (enter_point)
    callbacks.py  SweepSummary, the Hydra callback: a sweep's end table and its own record
"""
