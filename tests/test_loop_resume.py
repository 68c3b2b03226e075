"""The quick demo loop, killed with SIGKILL at random moments and resumed, ends with the same artifacts
as an uninterrupted run (same config, same seed)."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, require_shared_data

QUICK = "configs/demo_arith.py:quick"


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _artifacts(root):
    """Hashes of the artifacts that must match: policies, trees, traces, pairs, predictions."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and (path.suffix in (".safetensors",) or path.name in (
                "sft_traces.jsonl", "pairs.jsonl", "prompts.jsonl", "predictions.jsonl")
                or (path.suffix == ".jsonl" and "/trees/" in f"/{rel}")):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _accuracies(report):
    base = {k: v["accuracy"] for k, v in report["base"].items()}
    iters = [(it["sft"]["greedy"]["accuracy"], it["cpl"]["greedy"]["accuracy"]) for it in report["iterations"]]
    return base, iters


@pytest.mark.slow
def test_quick_loop_killed_at_random_points_resumes_to_the_same_artifacts(tmp_path):
    require_shared_data()
    whole = _cli("loop", f"--config={QUICK}", f"--workdir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "iteration 1:" in whole.stdout

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

    a = json.loads((tmp_path / "whole" / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    assert _accuracies(a) == _accuracies(b)
    assert _artifacts(tmp_path / "whole") == _artifacts(killed)
