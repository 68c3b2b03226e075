"""Shared pieces of the benchmarks: a measured matmul peak and streaming bandwidth, median timing, the
machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def require_torch(flag: str) -> None:
    """Stop before any timing when `flag` asks for a PyTorch comparison and PyTorch is not installed
    (the test extras install it; the loop never needs it)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SystemExit(f"--{flag} times PyTorch on the same weights, and PyTorch is not installed: "
                         f"`.venv/bin/pip install -e \".[test]\"`, or pass --no{flag}")


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


def measure_stream_bandwidth(matrices: int = 32, rows: int = 512, cols: int = 4096, repeats: int = 7,
                             dtype=jnp.float32) -> dict:
    """Bytes/s at which one jitted program of vector-matrix products reads `matrices` weight-like
    matrices (8 MiB each by default, 256 MiB in all: far more than the caches): how fast decoding one
    row can stream a model's weights, layer after layer; the memory side of the sampler's roofline.
    (One 256 MiB matrix streams 10-30% slower on 2 CPU cores.) Best and median of `repeats` timed runs."""
    keys = jax.random.split(jax.random.PRNGKey(0), matrices)
    ws = [jax.random.normal(k, (rows, cols), dtype) for k in keys]
    x = jnp.ones((1, rows), dtype)
    vecmats = jax.jit(lambda x, ws: [x @ w for w in ws])
    seconds, times = median_seconds(lambda: jax.block_until_ready(vecmats(x, ws)), repeats=repeats, warmup=2)
    nbytes = float(matrices * rows * cols * jnp.dtype(dtype).itemsize)
    return {"bytes": nbytes, "best_bytes_per_s": nbytes / min(times), "median_bytes_per_s": nbytes / seconds}


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
