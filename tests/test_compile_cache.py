"""The persistent compilation cache `alphallm` turns on: where it goes, how it is turned off, and that a
compiled program lands in it (a subprocess, so this session's JAX state is untouched)."""

import os
import subprocess
import sys

from alphallm_jax.utils import compile_cache
from tests.helpers import REPO_ROOT

PROBE = ("from alphallm_jax.utils.compile_cache import enable_compilation_cache as e; print(e()); "
         "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()")


def _run(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("ALPHALLM_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_compiled_programs_land_in_the_configured_directory(tmp_path):
    cache = tmp_path / "xla"
    assert _run({"ALPHALLM_COMPILATION_CACHE": str(cache)}) == str(cache)
    assert any(cache.iterdir())  # the tiny program was written although it compiled in milliseconds


def test_the_cache_is_off_on_request_and_defaults_under_xdg_cache_home(tmp_path):
    assert _run({"ALPHALLM_COMPILATION_CACHE": "off"}) == "None"
    assert _run({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "alphallm_jax" / "xla")
    assert any((tmp_path / "alphallm_jax" / "xla").iterdir())
    theirs = tmp_path / "theirs"
    assert _run({"JAX_COMPILATION_CACHE_DIR": str(theirs), "ALPHALLM_COMPILATION_CACHE": str(tmp_path / "ours")}) \
        == str(theirs)
    assert not (tmp_path / "ours").exists()


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == str(tmp_path / "alphallm_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir().endswith(os.path.join(".cache", "alphallm_jax", "xla"))
