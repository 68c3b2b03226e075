"""Test-wide setup: 8 simulated CPU devices, so sharded code paths run on any machine; one persistent
compilation cache for the session's `alphallm` subprocesses (the loop runs compile the same programs)."""

import atexit
import os
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

if "ALPHALLM_COMPILATION_CACHE" not in os.environ:  # hermetic: never the user's ~/.cache
    _cache_dir = tempfile.mkdtemp(prefix="alphallm-test-xla-")
    os.environ["ALPHALLM_COMPILATION_CACHE"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, True)


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

QUICK_LOOP_CONFIG = "configs/demo_arith.py:quick"


@pytest.fixture(scope="session")
def quick_loop_run(tmp_path_factory):
    """One uninterrupted single-process run of the quick demo loop, shared by the tests that compare
    other runs (killed and resumed, two processes) against it: its workdir."""
    from tests.helpers import REPO_ROOT, require_shared_data

    require_shared_data()
    workdir = tmp_path_factory.mktemp("quick_loop") / "whole"
    out = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "loop", f"--config={QUICK_LOOP_CONFIG}",
                          f"--workdir={workdir}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iteration 1:" in out.stdout
    return workdir


def pytest_collection_modifyitems(config, items):
    """The quick-loop end-to-end module (the longest by far) runs first: under pytest-xdist (CI runs
    `-n 2 --dist loadfile`) one worker starts on it at once while the other takes every other module."""
    items.sort(key=lambda item: item.path.name != "test_quick_loop.py")  # stable: the rest keep their order
