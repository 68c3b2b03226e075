"""Shared pieces of the benchmarks: a measured matmul peak, median timing, the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` (which must block until its work is done) after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure_matmul_peak(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> dict:
    """FLOP/s of a jitted n x n x n matmul on the default device, best and median of `repeats` timed runs."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds, times = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats=repeats, warmup=2)
    flops = 2.0 * n**3
    return {"n": n, "best_flops": flops / min(times), "median_flops": flops / seconds}


def matmul_peak_flops(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
    """The median of `measure_matmul_peak`: the peak the sampler's rooflines are taken against."""
    return measure_matmul_peak(n, repeats, dtype)["median_flops"]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import flax

    info = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info
