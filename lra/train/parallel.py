"""Data parallelism: one mesh axis over every device, batch sharded, parameters replicated.

Multi-host: `dist.coordinator_address` / `dist.num_processes` / `dist.process_id` call
`jax.distributed.initialize`; every process builds the same global batch (a function of
(seed, step)) and hands JAX only its own rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXIS = "data"


def init_distributed(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    if not coordinator_address:
        if num_processes > 1:
            raise ValueError(f"dist.num_processes={num_processes} needs dist.coordinator_address "
                             f"(host:port of process 0)")
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
             jax.process_count(), jax.device_count())


class DataParallel:
    """Places the train state (replicated) and batches (split on axis 0) on a device mesh."""

    def __init__(self, batch_size: int, enabled: bool | None = None):
        devices = jax.devices()
        self.enabled = len(devices) > 1 if enabled is None else bool(enabled)
        if not self.enabled:
            devices = devices[:1]
        self.num_devices = len(devices)
        if batch_size % self.num_devices:
            raise ValueError(f"train.batch_size={batch_size} does not divide over "
                             f"{self.num_devices} devices; use a multiple of {self.num_devices} "
                             f"or train.data_parallel=false")
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.process_count = jax.process_count()
        self.process_index = jax.process_index()

    def state(self, tree: Any) -> Any:
        if not self.enabled:
            return tree
        return jax.device_put(tree, self.replicated)

    def local_rows(self, global_rows: int) -> slice:
        """The rows of a global batch that this process feeds (all of them on one host)."""
        per = global_rows // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    def feed(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict]:
        """`batches` placed on the mesh, one by one as they are drawn."""
        return map(self.batch, batches)

    def batch(self, batch: dict[str, np.ndarray]) -> dict:
        if not self.enabled:
            return batch
        if self.process_count == 1:
            return jax.device_put(batch, self.batch_sharding)
        rows = self.local_rows(len(next(iter(batch.values()))))
        return {key: jax.make_array_from_process_local_data(self.batch_sharding, value[rows])
                for key, value in batch.items()}
