"""The quick demo loop, killed with SIGKILL at random moments of its second iteration and resumed, ends
with the same artifacts as an uninterrupted run (same config, same seed).

The killed run continues a copy of the uninterrupted run's workdir with iteration 2, the ablations and
the report removed, so every kill lands in the stages that build on earlier ones (imagination, search,
SFT, pairs and DPO, evaluation, the ordering ablations). The stages before are resumed the same way;
their components' own resume (the trainer's checkpoints, the critic data, searches and evaluations per
problem) is tested where they are built."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, loop_accuracies, loop_artifact_hashes

QUICK = "configs/demo_arith.py:quick"


def _copy_run(source, target, *, drop):
    """A copy of a loop workdir without the stages named in `drop`. The copy's records still name the
    source's paths: the resumed run must move them under the copy itself (`read_stage_record`)."""
    shutil.copytree(source, target)
    for name in drop:
        path = target / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_quick_loop_killed_at_random_points_resumes_to_the_same_artifacts(quick_loop_run, tmp_path):
    killed = tmp_path / "killed"
    _copy_run(quick_loop_run, killed, drop=["iter_2", "ablations", "report.json", "report.md",
                                            "accuracy_per_iteration.png", "accuracy_vs_tokens.png"])
    rng = random.Random(int(os.environ.get("ALPHALLM_KILL_SEED", "0")))
    command = [sys.executable, "-m", "alphallm_jax.cli", "loop", f"--config={QUICK}", f"--workdir={killed}"]
    for _ in range(2):
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(8.0, 30.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[iter_1/search] done before; skipped" in resumed.stdout

    a = json.loads((quick_loop_run / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    assert loop_accuracies(a) == loop_accuracies(b)
    hashes = loop_artifact_hashes(killed)
    assert any(name.startswith("iter_2/") for name in hashes)
    assert loop_artifact_hashes(quick_loop_run) == hashes
