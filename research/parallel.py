"""Data parallelism: one global batch sharded over a one-axis `data` device mesh.

`jax.jit` with `NamedSharding` is the current form of pmap-style data parallelism: parameters
are replicated, the batch is split along its first axis, and XLA inserts the all-reduces, so
gradients and BatchNorm statistics are computed over the *global* batch inside the step.
Multi-host runs call `initialize_distributed` first; each process then feeds only its own
slice of the global batch (`global_batch`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           local_device_ids: Any = None) -> None:
    """Calls `jax.distributed.initialize` for multi-host runs (no-op for one process).

    With empty arguments JAX auto-detects cluster environments (SLURM, TPU pods, …); explicit
    arguments start a run by hand, e.g. two processes on 127.0.0.1.
    """
    if num_processes and num_processes > 1 or coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address or None,
                      num_processes=num_processes or None,
                      process_id=process_id if process_id >= 0 else None)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
        jax.distributed.initialize(**kwargs)
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int) -> int:
    """The global batch must split evenly over devices; returns the per-process batch."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the "
                         f"{n_dev} devices of the data mesh")
    return global_batch_size // n_proc


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded along `data`."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    sharding = replicated(mesh)
    # Every process holds the same values: build the global arrays from local copies, with no
    # cross-process check (a collective that would time out while another process compiles).
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process gets here (no-op for one process).

    Gloo's CPU collectives give up after 30 s when a peer is late, e.g. still compiling; a
    barrier through the coordination service before the first collective avoids that.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client JAX's own multi-process tests use
    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def local_copy(tree: Any) -> Any:
    """Replicated global arrays -> this process's own copy (numpy), for host-local work."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree_util.tree_map(get, tree)


def fetch(tree: Any) -> Any:
    """Replicated (or fully addressable) arrays -> numpy on this host."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = jax.experimental.multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)
    return jax.tree_util.tree_map(get, tree)


import jax.experimental.multihost_utils  # noqa: E402,F401  (used by fetch)
