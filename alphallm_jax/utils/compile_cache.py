"""JAX's persistent compilation cache, on by default for `alphallm` commands.

A loop compiles a few hundred XLA programs (prefill, decode and straggler-resume per batch bucket, critic
scoring, train steps), and on a 2-core CPU that is a large share of a short run; on TPU pods a 70B
program takes minutes. With the cache, a resumed run, a second run, or a second process of the same
host reads the executables back instead of compiling them again (the key covers the program, the
compile options, the devices and the JAX version, so results are those of a fresh compile).

`ALPHALLM_COMPILATION_CACHE` chooses the directory (a local path or a bucket); `off` disables it. The
default is `$XDG_CACHE_HOME/alphallm_jax/xla` (`~/.cache/...`). A user's own `JAX_COMPILATION_CACHE_DIR`
wins over both.
"""

from __future__ import annotations

import os

ENV_CACHE = "ALPHALLM_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false", "none", "")


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "alphallm_jax", "xla")


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent cache at the configured directory; returns it (None when disabled)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX read it already
    value = os.environ.get(ENV_CACHE)
    if value is not None and value.strip().lower() in OFF_VALUES:
        return None
    path = value.strip() if value else default_cache_dir()
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Most programs here compile in well under JAX's default 1 s threshold (a tiny model's decode loop
    # takes ~0.5-1 s on CPU), yet together they are minutes: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
