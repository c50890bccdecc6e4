"""`hydra/launcher=pool`, the launcher of `lra.run -m` (configs/config.yaml): it hands the
sweep's points to lra.sweep.executor, `n_jobs` at a time (1 by default), each in a worker process of
its own (`fresh_process=true`, the default) or in workers reused from point to point (one import
of JAX per worker), where a worker's death costs its own point only; the executor's module doc
says what it guarantees.

Hydra's joblib launcher reuses workers too, but when one dies (the kernel's OOM killer, a crash
in XLA, a kill -9) loky ends the whole multirun: the points that were running beside it and every
point not yet started are lost, and nobody writes the dead point's row.

Hydra takes launchers from the `hydra_plugins` package only, so `register()` (lra.cli.setup)
lists this class there under that name; the launcher's config is stored as hydra/launcher=pool.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from lra.sweep.executor import Executor, Job, LostHandler, Sweep
from lra.sweep.executor import on_lost as set_on_lost

log = logging.getLogger(__name__)

PLUGIN_MODULE = "hydra_plugins.lra_pool"


@dataclasses.dataclass
class PoolConf:
    _target_: str = f"{PLUGIN_MODULE}.PoolLauncher"
    n_jobs: int = 1  # points at a time (one worker process each)


def register(on_lost: LostHandler | None = None) -> None:
    """Make `hydra/launcher=pool` known to Hydra (idempotent); `on_lost` writes a dead point's
    row (lra.run sets it: lra.run.record_lost_point)."""
    if on_lost is not None:
        set_on_lost(on_lost)
    if PLUGIN_MODULE not in sys.modules:
        module = types.ModuleType(PLUGIN_MODULE, "lra.sweep.pool's launcher, named for Hydra")
        module.PoolLauncher = PoolLauncher
        sys.modules[PLUGIN_MODULE] = module
        PoolLauncher.__module__ = PLUGIN_MODULE
        ConfigStore.instance().store(group="hydra/launcher", name="pool", node=PoolConf,
                                     provider="lra")
    Plugins.instance().register(PoolLauncher)


class PoolLauncher(Launcher):
    def __init__(self, n_jobs: int = 1, **_: Any) -> None:
        if int(n_jobs) < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs}; use 1 or more")
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("pool of %d worker(s) launching %d jobs, sweep output dir: %s",
                 self.n_jobs, len(job_overrides), sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        # fresh_process (lra.run's default): a worker of its own per point, so a point's peak
        # memory is its own (RSS high-water marks are per process); lra.bench's lengths always are.
        fresh = bool(self.config.get("fresh_process", False)) and \
            int(OmegaConf.select(self.config, "dist.num_processes", default=1)) <= 1
        sweep = Sweep(self.task_function, self.hydra_context, self.config, fresh=fresh)
        jobs = [Job(initial_job_idx + i, list(o), sweep) for i, o in enumerate(job_overrides)]
        return Executor(min(self.n_jobs, len(jobs))).run(jobs)
