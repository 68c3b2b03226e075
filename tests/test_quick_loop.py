"""The quick demo loop's end-to-end tests, each compared with one uninterrupted one-process run (the
`quick_loop_run` session fixture; CI's `--dist loadfile` keeps this module on one pytest-xdist worker,
so that run is made once).

Killed with SIGKILL at random moments of its second iteration and resumed, the loop ends
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

from tests.conftest import QUICK_LOOP_CONFIG as QUICK
from tests.helpers import REPO_ROOT, json_schema, loop_accuracies, loop_artifact_hashes, subprocess_env

LOCAL_LAUNCHER = REPO_ROOT / "launch" / "local.sh"


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
def test_two_processes_run_the_one_process_quick_loop(quick_loop_run, tmp_path):
    """`alphallm loop` (quick demo) as two hosts: the training stages step data parallel over both, the
    critic rollouts, searches and evaluations split their work between the processes, process 0 merges
    and writes the stage records.

    What must equal one process: the stages, the report's schema, the artifacts written, the evaluated
    problems in their order, and the base policy up to float reduction order. What need not, exactly: the
    later stages. Data-parallel training sums gradients in another order than one device does, and even
    the same two-way sum differs in the last bits between one process of two devices and two processes
    (measured: 1e-5 on the base policy after two steps), so a sampled token can flip (seen on one machine
    kind and not another) and every later synthesized prompt, tree and pair follows it. The base stage's
    accuracies must stay within two problems; the iterations' need not (their policies are trained on
    other prompts and trees by then: one CI run saw 3 of 16 against 0 of 16 after iteration 2's DPO).
    Sharded evaluation alone is exact (`test_multiprocess.py`'s sweep test)."""
    import numpy as np
    from safetensors.numpy import load_file

    two = tmp_path / "two"
    out = subprocess.run(["bash", str(LOCAL_LAUNCHER), "--num_processes=2", f"--log_dir={tmp_path / 'logs'}", "--", "loop",
                          f"--config={QUICK}", f"--workdir={two}"], cwd=REPO_ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + logs[-3000:]
    assert "iteration 2:" in out.stdout
    runs = (quick_loop_run, two)

    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    assert json_schema(reports[0]) == json_schema(reports[1])
    (base_one, iters_one), (base_two, iters_two) = (loop_accuracies(r) for r in reports)
    within = 2 / reports[0]["base"]["greedy"]["n"] + 1e-9
    assert base_one.keys() == base_two.keys()
    assert all(abs(base_one[m] - base_two[m]) <= within for m in base_one), (base_one, base_two)
    assert len(iters_one) == len(iters_two) == 2

    # The same artifacts (tree files are named by the synthesized prompts, which may differ).
    names = [{n for n in loop_artifact_hashes(run, suffixes=()) if "/trees/" not in n} for run in runs]
    assert names[0] == names[1]
    predictions = sorted(n for n in names[0] if n.endswith("predictions.jsonl"))
    assert any(n.startswith("iter_2/") for n in predictions)
    for name in predictions:  # merged from both processes' parts, in the problems' order
        ids = [[json.loads(line)["id"] for line in (run / name).read_text().splitlines()] for run in runs]
        assert ids[0] == ids[1], name
        assert sorted(p.name for p in (two / name).parent.glob("predictions.part*")) == [
            "predictions.part000-of-002.jsonl", "predictions.part001-of-002.jsonl"], name

    # The base policy, trained data parallel over both processes' devices (global parameters and
    # optimizer state, both orbax managers committing): one process's weights up to reduction order.
    records = [json.loads((run / "base" / "base_policy.json").read_text()) for run in runs]
    assert records[0]["steps"] == records[1]["steps"] > 0
    assert abs(records[0]["best_dev_loss"] - records[1]["best_dev_loss"]) < 1e-4
    a, b = (load_file(next((run / "base" / "policy").glob("*.safetensors"))) for run in runs)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
def test_the_quick_loop_runs_on_a_mesh_spanning_two_processes(quick_loop_run, tmp_path):
    """The loop as a pod runs it: two processes of two simulated devices each, one `--config.mesh.*` over
    all four, fsdp across the processes and tensor within each (the 70B presets' layout in miniature:
    parameters and batch rows split between hosts, heads within one). The critic (its backbone sharded, its heads too), the
    critic data, searches, SFT, DPO and evaluations all run on that mesh, every process making each
    sampling and scoring call together (lockstep) and process 0 writing the results. From the
    one-process run's base policy (its stage copied), one iteration.

    Sharded products sum in another order than one device's, so sampled tokens can flip and later
    stages differ; the greedy evaluation of the same base policy stays within two problems."""
    run = tmp_path / "mesh"
    run.mkdir()
    shutil.copytree(quick_loop_run / "base", run / "base")
    out = subprocess.run(["bash", str(LOCAL_LAUNCHER), "--num_processes=2", "--devices_per_process=2",
                          f"--log_dir={tmp_path / 'logs'}", "--", "loop", f"--config={QUICK}", f"--workdir={run}",
                          "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                          "--config.loop.iterations=1", "--config.loop.search_ablation=False",
                          "--config.loop.ablation_seeds=0", "--config.loop.base_methods=greedy"],
                         cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + logs[-3000:]
    for output in (out.stdout, logs):  # both processes ran every stage
        assert "[base] done before; skipped" in output and "iteration 1:" in output
    report = json.loads((run / "report.json").read_text())
    one = json.loads((quick_loop_run / "report.json").read_text())
    assert set(report["critics"]) == set(one["critics"])
    assert len(report["iterations"]) == 1 and report["iterations"][0]["cpl"]["greedy"]["n"] > 0
    n = one["base"]["greedy"]["n"]
    assert report["base"]["greedy"]["n"] == n
    assert abs(report["base"]["greedy"]["accuracy"] - one["base"]["greedy"]["accuracy"]) <= 2 / n + 1e-9
    # Shared work is written once, by process 0: one part per evaluation, not one per process.
    parts = {p.name for p in run.rglob("predictions.part*")}
    assert parts == {"predictions.part000-of-001.jsonl"}
    trees = list((run / "iter_1" / "search" / "trees").glob("*"))
    assert len(trees) == report["iterations"][0]["synthesized_prompts"] > 0
