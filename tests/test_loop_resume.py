"""The quick demo loop, killed with SIGKILL at random moments and resumed, ends with the same artifacts
as an uninterrupted run (same config, same seed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, loop_accuracies, loop_artifact_hashes

QUICK = "configs/demo_arith.py:quick"


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_loop_killed_at_random_points_resumes_to_the_same_artifacts(quick_loop_run, tmp_path):
    killed = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("ALPHALLM_KILL_SEED", "0")))
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "alphallm_jax.cli", "loop", f"--config={QUICK}",
                                 f"--workdir={killed}"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(15.0, 60.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = _cli("loop", f"--config={QUICK}", f"--workdir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = json.loads((quick_loop_run / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    assert loop_accuracies(a) == loop_accuracies(b)
    assert loop_artifact_hashes(quick_loop_run) == loop_artifact_hashes(killed)
