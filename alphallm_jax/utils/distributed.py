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


def check_sampling_mesh(mesh) -> None:
    """Sampling and critic scoring split their problems between processes, each feeding its own devices,
    so in a multi-process run their mesh must lie within this process's devices; a mesh spanning
    processes (a pod's `--config.mesh.*`) would take a different batch from every process and fails at
    the first call. Refused here, before any work, until sampling runs as one program across hosts."""
    import jax

    if mesh is None or jax.process_count() == 1:
        return
    local = set(jax.local_devices())
    if not set(mesh.devices.flat) <= local:
        shape = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
        raise ValueError(
            f"mesh {shape} spans the devices of several processes; sampling and critic scoring split their "
            f"problems between the {jax.process_count()} processes, each on its own devices, so a multi-process "
            "run that samples takes no mesh (--config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1: "
            "training is then data parallel over every process's devices, sampling on each process's first "
            "device). `alphallm train-policy` alone may span processes; sampling over a mesh across hosts is "
            "not supported yet")


def this_process_share(items):
    """Items i with i % process_count == process_index: a fixed split of a list of work, the same
    whatever has already been done (so every item belongs to exactly one process, resumed or not)."""
    import jax

    return items[jax.process_index()::jax.process_count()]


def host_array(x) -> np.ndarray:
    """A jax.Array as one numpy array on every process, gathering the shards other hosts hold."""
    import jax

    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def broadcast_int(value: int) -> int:
    """Process 0's `value` on every process (so that all take the same branch, e.g. where to resume)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over every process (the same keys on each), e.g. the tokens each host's
    sampler prefilled for its share of a search; unchanged for a single process."""
    import jax

    if jax.process_count() == 1:
        return dict(counts)
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    mine = np.asarray([int(counts[k]) for k in keys], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(keys))
    return {k: int(v) for k, v in zip(keys, every.sum(axis=0))}

