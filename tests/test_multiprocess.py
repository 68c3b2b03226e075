"""Two CPU processes as two hosts of one JAX runtime (`launch/local.sh`): an evaluation sweep, sharded over
the processes and merged by process 0, gives the same table and predictions as one process (sampled
methods included); the quick demo loop gives one process's stages, report schema, artifacts and base
policy (trained data parallel over both), with accuracies close; and the launchers' contracts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "launch" / "local.sh"


def _tiny_checkpoints(directory: Path) -> list[Path]:
    from flax import nnx

    from alphallm_jax.models.decoder import Decoder
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from tests.tiny_lm import arith_tokenizer, model_config

    tok = arith_tokenizer(directory)
    cfg = model_config(tok)
    paths = [directory / f"policy{seed}" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        save_hf_checkpoint(Decoder(cfg, rngs=nnx.Rngs(seed)), cfg, path, tokenizer=tok)
    return paths


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALPHALLM_", "JAX_", "XLA_")) or k == "ALPHALLM_COMPILATION_CACHE"}
    env["PYTHON"] = sys.executable
    env["ALPHALLM_CMD"] = f"{sys.executable} -m alphallm_jax.cli"
    env["PYTHONPATH"] = str(REPO)
    return env


def _run_one_and_two(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`alphallm ARGS` as one process into tmp_path/one, then as two (`launch/local.sh`) into tmp_path/two;
    both must succeed. Returns the two-process run (process 0's output)."""
    one = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args, f"--workdir={tmp_path / 'one'}"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path / 'logs'}", "--",
                          *args, f"--workdir={tmp_path / 'two'}"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert two.returncode == 0, two.stderr[-3000:] + logs[-3000:]
    return two


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
def test_two_processes_give_the_one_process_sweep(tmp_path):
    """`alphallm sweep` over two checkpoints: every evaluation sharded over the processes, merged by process 0,
    read back by the other (the loop's evaluations go through the same `evaluate_policy`)."""
    p0, p1 = _tiny_checkpoints(tmp_path)
    args = ["sweep", "--config=configs/demo_arith.py:quick", f"--config.sweep.checkpoints=('a={p0}','b={p1}')",
            "--config.sweep.methods=('greedy','maj')", "--config.sweep.budgets=(4,)",
            "--config.eval.limit=12", "--config.eval.max_new_tokens=12", "--config.eval.batch_size=4"]
    two = _run_one_and_two(args, tmp_path)
    parts = sorted(p.name for p in (tmp_path / "two" / "b" / "eval" / "greedy").glob("predictions.part*"))
    assert parts == ["predictions.part000-of-002.jsonl", "predictions.part001-of-002.jsonl"]
    for name in ("sweep.json", "sweep.md", *(f"{c}/eval/{f}" for c in "ab" for f in (
            "summary.json", "greedy/predictions.jsonl", "maj_4/predictions.jsonl"))):
        a = (tmp_path / "one" / name).read_text()
        b = (tmp_path / "two" / name).read_text()
        assert a == b, name
    table = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert [(r["checkpoint"], r["method"], r["n"]) for r in table["rows"]] == [
        (c, m, 12) for c in "ab" for m in ("greedy", "maj@4")]  # sampled: each problem's seed is its own
    assert "maj@4" in two.stdout  # process 0 prints the merged table


def _schema(value):
    """A JSON value with every scalar replaced by a placeholder: its keys and list lengths only."""
    if isinstance(value, dict):
        return {k: _schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_schema(v) for v in value]
    return "value"


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
    Sharded evaluation alone is exact (the sweep test above)."""
    import numpy as np
    from safetensors.numpy import load_file

    from tests.conftest import QUICK_LOOP_CONFIG
    from tests.helpers import loop_accuracies, loop_artifact_hashes

    two = tmp_path / "two"
    out = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path / 'logs'}", "--", "loop",
                          f"--config={QUICK_LOOP_CONFIG}", f"--workdir={two}"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + logs[-3000:]
    assert "iteration 2:" in out.stdout
    runs = (quick_loop_run, two)

    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    assert _schema(reports[0]) == _schema(reports[1])
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


def test_local_launcher_sets_the_distributed_environment(tmp_path):
    probe = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in ('ALPHALLM_COORDINATOR', "
             "'ALPHALLM_NUM_PROCESSES', 'ALPHALLM_PROCESS_ID', 'JAX_PLATFORMS', 'JAX_NUM_CPU_DEVICES')}))")
    env = _env() | {"ALPHALLM_CMD": f"{sys.executable} -c"}
    out = subprocess.run(["bash", str(LOCAL), "--num_processes=3", "--devices_per_process=2", "--port=23456",
                          f"--log_dir={tmp_path}", "--", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    seen = [json.loads(out.stdout)] + [json.loads((tmp_path / f"process_{i}.log").read_text()) for i in (1, 2)]
    assert [s["ALPHALLM_PROCESS_ID"] for s in seen] == ["0", "1", "2"]
    assert all(s["ALPHALLM_COORDINATOR"] == "localhost:23456" and s["ALPHALLM_NUM_PROCESSES"] == "3"
               and s["JAX_PLATFORMS"] == "cpu" and s["JAX_NUM_CPU_DEVICES"] == "2" for s in seen)
    failing = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path}", "--",
                              "import os, sys; sys.exit(int(os.environ['ALPHALLM_PROCESS_ID']) * 3)"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert failing.returncode == 3 and "process 1 exited with status 3" in failing.stderr
    usage = subprocess.run(["bash", str(LOCAL), "--", "eval"], cwd=REPO, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
def test_counters_are_summed_over_processes(tmp_path):
    """`sum_over_processes` (the search summary's sampler and backend counters): every host's own counts
    add up on every host."""
    probe = ("import json, os; from alphallm_jax.utils.distributed import maybe_initialize_distributed, "
             "sum_over_processes; maybe_initialize_distributed(); i = int(os.environ['ALPHALLM_PROCESS_ID']); "
             "print(json.dumps(sum_over_processes({'tokens': 10 ** i, 'calls': 3 + i})))")
    env = _env() | {"ALPHALLM_CMD": f"{sys.executable} -c"}
    out = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path}", "--", probe], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    other = (tmp_path / "process_1.log").read_text().strip().splitlines()[-1]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(other) == {"tokens": 11, "calls": 7}


def test_maybe_initialize_distributed_reads_the_environment(monkeypatch):
    import jax

    from alphallm_jax.utils import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_AUTO, distributed.ENV_LOCAL_DEVICE_IDS):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "host0:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    monkeypatch.setenv(distributed.ENV_LOCAL_DEVICE_IDS, "0,1")
    assert distributed.maybe_initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2,
                         "local_device_ids": [0, 1]}
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "4")
    with pytest.raises(ValueError, match="not below"):
        distributed.maybe_initialize_distributed()
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    monkeypatch.setenv(distributed.ENV_AUTO, "auto")
    assert distributed.maybe_initialize_distributed() is True and calls[-1] == {}
    # One process: the helpers are no-ops.
    assert distributed.broadcast_int(7) == 7 and distributed.is_coordinator()
    distributed.barrier("single")


@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/tpu_pod.sh needs bash")
def test_tpu_pod_launcher_runs_one_command_on_every_worker(tmp_path):
    """`launch/tpu_pod.sh` with a stand-in `gcloud` that records its arguments: one ssh to --worker=all whose
    remote command cds into the checkout, joins the pod (ALPHALLM_DISTRIBUTED=auto) and passes the alphallm
    arguments through quoted; --setup installs first; bad usage and a missing gcloud fail with a message."""
    tpu_pod, bash = REPO / "launch" / "tpu_pod.sh", shutil.which("bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gcloud_args.json"
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = _env() | {"PATH": str(bin_dir)}  # the launcher needs nothing but bash builtins and gcloud
    args = ["loop", "--config=configs/llama2_70b_gsm8k.py:v5p-128", "--workdir=gs://bucket/runs/70b",
            "--config.loop.base_methods=('greedy', 'mcts')"]
    out = subprocess.run([bash, str(tpu_pod), "--tpu=pod-a", "--zone=us-east5-a", "--project=proj", "--", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = json.loads(record.read_text())
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--zone=us-east5-a" in argv and "--worker=all" in argv and "--project=proj" in argv
    remote = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert remote.startswith("cd ~/alphallm_jax && ALPHALLM_DISTRIBUTED=auto .venv/bin/alphallm loop ")
    # What each worker's shell will run: the arguments come back exactly, spaces and quotes included.
    echoed = subprocess.run([bash, "-c", remote.split(" && ", 1)[1].replace(".venv/bin/alphallm", "printf '%s\\n'")],
                            capture_output=True, text=True, timeout=30)
    assert echoed.stdout.splitlines() == args

    setup = subprocess.run([bash, str(tpu_pod), "--tpu=pod-a", "--zone=z", "--repo=/opt/a", "--setup", "--", "eval"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert setup.returncode == 0, setup.stderr
    remote = next(a for a in json.loads(record.read_text()) if a.startswith("--command="))
    assert remote.startswith("--command=cd /opt/a && python3 -m venv .venv && ") and "pip install" in remote
    assert remote.endswith("&& ALPHALLM_DISTRIBUTED=auto .venv/bin/alphallm eval")

    usage = subprocess.run([bash, str(tpu_pod), "--zone=z", "--", "eval"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr
    no_gcloud = subprocess.run([bash, str(tpu_pod), "--tpu=t", "--zone=z", "--", "eval"], cwd=REPO,
                               env=env | {"PATH": str(tmp_path / "empty")}, capture_output=True, text=True, timeout=60)
    assert no_gcloud.returncode == 2 and "gcloud is not installed" in no_gcloud.stderr
