"""Multi-host start-up and the few cross-process helpers the pipeline needs.

`alphallm` calls `maybe_initialize_distributed()` before anything touches a JAX backend. It joins a
multi-process JAX runtime when the environment asks for one:

* `ALPHALLM_COORDINATOR=host:port`, `ALPHALLM_NUM_PROCESSES=N`, `ALPHALLM_PROCESS_ID=i` (set by
  `launch/local.sh`, or by hand / by a scheduler on GPU hosts; `ALPHALLM_LOCAL_DEVICE_IDS=0,1,..`
  optionally restricts the devices this process drives);
* `ALPHALLM_DISTRIBUTED=auto`: `jax.distributed.initialize()` with JAX's own cluster detection (TPU-VM
  pods, SLURM, Open MPI), as `launch/tpu_pod.sh` sets on every worker.

Without either, nothing happens and the run is a single process.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

ENV_COORDINATOR = "ALPHALLM_COORDINATOR"
ENV_NUM_PROCESSES = "ALPHALLM_NUM_PROCESSES"
ENV_PROCESS_ID = "ALPHALLM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ALPHALLM_LOCAL_DEVICE_IDS"
ENV_AUTO = "ALPHALLM_DISTRIBUTED"


def _required_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.strip().isdigit():
        raise ValueError(f"${ENV_COORDINATOR} is set, so ${name} must be a non-negative integer, got {value!r}")
    return int(value)


def maybe_initialize_distributed() -> bool:
    """Join the multi-process runtime the environment describes; True when this run is multi-process."""
    import jax

    if jax.distributed.is_initialized():
        return True
    coordinator = os.environ.get(ENV_COORDINATOR, "").strip()
    if coordinator:
        num_processes = _required_int(ENV_NUM_PROCESSES)
        process_id = _required_int(ENV_PROCESS_ID)
        if process_id >= num_processes:
            raise ValueError(f"${ENV_PROCESS_ID}={process_id} is not below ${ENV_NUM_PROCESSES}={num_processes}")
        local_ids = os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            local_device_ids=[int(i) for i in local_ids.split(",")] if local_ids else None)
        return True
    if os.environ.get(ENV_AUTO, "").strip().lower() in ("1", "true", "auto"):
        jax.distributed.initialize()
        return True
    return False


def is_coordinator() -> bool:
    """Process 0: the one that writes shared artifacts."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def spans_processes(mesh) -> bool:
    """Whether `mesh` holds devices of other processes: sampling on it runs every device call on every
    process at once (lockstep), each process with the same requests."""
    import jax

    return mesh is not None and jax.process_count() > 1 and not set(mesh.devices.flat) <= set(jax.local_devices())


def check_sampling_mesh(mesh) -> None:
    """A multi-process run samples either on each process's own devices (no mesh, or a mesh within this
    process: the problems are split between processes) or on a mesh of every process's devices (every
    process runs every device call with the same requests, process 0 writes the results). A mesh over
    some processes only would leave the others out of its calls: refused here, before any work."""
    import jax

    if not spans_processes(mesh):
        return
    holders = {d.process_index for d in mesh.devices.flat}
    if len(holders) != jax.process_count():
        shape = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
        raise ValueError(
            f"mesh {shape} spans the devices of processes {sorted(holders)} of {jax.process_count()}; sampling on "
            "a mesh across processes needs every process in it (a mesh over all devices), or a mesh within one "
            "process's devices")


def this_process_share(items, mesh=None):
    """This process's share of a list of work sampled on `mesh`. Each process on its own devices: items i
    with i % process_count == process_index, a fixed split, the same whatever has already been done (so
    every item belongs to exactly one process, resumed or not). On a mesh spanning processes: every item
    (every process takes part in each device call; `writes_results` says who writes)."""
    import jax

    if spans_processes(mesh):
        return list(items)
    return items[jax.process_index()::jax.process_count()]


def writes_results(mesh=None) -> bool:
    """Whether this process writes the results of its share (`this_process_share`): every process for its
    own share, but only process 0 when the mesh spans processes (all compute the same results)."""
    return not spans_processes(mesh) or is_coordinator()


def coordinator_flags(flags, mesh=None) -> list[bool]:
    """Process 0's `flags` on every process when `mesh` spans processes (e.g. which items are already
    finished on disk), so that processes sampling in lockstep skip the same items even if their views of
    the disk differ; this process's own `flags` otherwise (each decides for its own share)."""
    flags = [bool(f) for f in flags]
    return [bool(f) for f in coordinator_array(np.asarray(flags, np.bool_))] if spans_processes(mesh) else flags


def coordinator_array(x) -> np.ndarray:
    """Process 0's numpy array `x` (the same shape on every process) on every process: for host-side
    results that feed sampling decisions but may differ between hosts (checks under a wall-clock budget)."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def check_lockstep(what: str, inputs) -> None:
    """Raise when the processes sampling in lockstep are about to make different device calls (`inputs`:
    this process's call, numpy arrays and plain values, hashed): their shards would mix different requests
    or their programs deadlock. Costs one small all-gather; called once per sampled or scored batch."""
    import jax
    from jax.experimental import multihost_utils

    digest = zlib.crc32(b"")
    for part in inputs:
        digest = zlib.crc32(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode(), digest)
    every = np.asarray(multihost_utils.process_allgather(np.asarray([digest & 0x7FFFFFFF], np.int32)))
    if len(set(every.reshape(-1).tolist())) > 1:
        raise RuntimeError(
            f"{what}: processes sampling on one mesh diverged (request digests {every.reshape(-1).tolist()} by "
            f"process; this is process {jax.process_index()}): every process must run the same stages on the "
            "same inputs; a host-dependent order or timing, or a workdir that differs between hosts, can cause this")


def fetch(tree):
    """`jax.device_get(tree)`, its arrays as numpy on every process: the arrays sharded over a mesh that
    spans processes have their other hosts' shards gathered, in one all-gather (every process must call
    this together)."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    out = [np.asarray(x) for x in jax.device_get([None if i in remote else x for i, x in enumerate(leaves)])]
    if remote:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, x in zip(remote, gathered):
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)


def broadcast_int(value: int) -> int:
    """Process 0's `value` on every process (so that all take the same branch, e.g. where to resume)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sum_over_processes(counts: dict[str, int], mesh=None) -> dict[str, int]:
    """Integer counters summed over every process (the same keys on each), e.g. the tokens each host's
    sampler prefilled for its share of a search; unchanged for a single process, and on a mesh spanning
    processes (each counted the same, shared, work)."""
    import jax

    if jax.process_count() == 1 or spans_processes(mesh):
        return dict(counts)
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    mine = np.asarray([int(counts[k]) for k in keys], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(keys))
    return {k: int(v) for k, v in zip(keys, every.sum(axis=0))}

