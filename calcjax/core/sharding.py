"""Device mesh, batch placement and multi-host start-up (data parallelism over a ``('data',)`` mesh).

The same code runs on one CPU, on fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``),
one GPU, a GPU cluster and a TPU pod: the batch is sharded on ``'data'``, parameters and optimizer state are
replicated, and each process feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")


def initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Detected from the environment (``JAX_COORDINATOR_ADDRESS``, SLURM, Cloud TPU); a single process does
    nothing. Explicit coordinates come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``.
    """
    if not any(os.environ.get(k) for k in _MULTIHOST_ENV):
        return
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )


def make_mesh(devices=None) -> Mesh:
    """A one-axis ``('data',)`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch; the global batch must divide over the devices."""
    if global_batch % mesh.size:
        raise ValueError(f"global batch {global_batch} does not divide over {mesh.size} devices")
    return global_batch // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy arrays (this process's rows) -> global ``jax.Array`` s sharded on ``'data'``."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_text(make, max_bytes: int = 256) -> str:
    """Process 0's ``make()`` (a short UTF-8 string) on every process; only process 0 calls ``make``."""
    if jax.process_count() == 1:
        return make()
    from jax.experimental import multihost_utils

    buf = np.zeros(max_bytes, np.uint8)  # the same shape on every process
    if jax.process_index() == 0:
        raw = make().encode()
        if len(raw) > max_bytes:
            raise ValueError(f"broadcast text of {len(raw)} bytes, more than {max_bytes}")
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(data).rstrip(b"\0").decode()
