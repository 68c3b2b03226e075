"""Two CPU processes as two hosts of one JAX runtime (`launch/local.sh`): an evaluation sweep, sharded over
the processes and merged by process 0, gives the same table and predictions as one process (sampled
methods included); and the launchers' contracts. (The quick demo loop as two processes is in
`test_quick_loop.py`, beside the one-process run it is compared with.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import subprocess_env

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


def _run_one_and_two(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`alphallm ARGS` as one process into tmp_path/one, then as two (`launch/local.sh`) into tmp_path/two;
    both must succeed. Returns the two-process run (process 0's output)."""
    one = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args, f"--workdir={tmp_path / 'one'}"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path / 'logs'}", "--",
                          *args, f"--workdir={tmp_path / 'two'}"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
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


# Run by every process of a two-process runtime and by one process of eight devices: samples on a mesh
# over every device (data x tensor = 2 x 4), keeps the states and continues them (the pool's gather),
# writes the completions; then each process asks for its own prompt (process i: prompt i), which differ,
# and then for one kept state that process 1's pool holds in another slot.
LOCKSTEP_PROBE = """
import json, os, sys
from alphallm_jax.utils.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
from alphallm_jax.models import make_mesh
from alphallm_jax.models.loading import load_pretrained
from alphallm_jax.sampling import SampleRequest, Sampler
checkpoint, out, chunk_slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
mesh = make_mesh(data=2, tensor=4)
model, tok = load_pretrained(checkpoint, mesh=mesh)
sampler = Sampler(model, tok, max_len=64, mesh=mesh, kv_chunk_slots=chunk_slots)
prompts = ["1 + 2 =", "3 * 4 + 5 =", "7 7 7 +", "9", "12 + 13 ="]
first = sampler.sample([SampleRequest(state=sampler.new_state(p), max_new_tokens=10, temperature=t, seed=i)
                        for i, p in enumerate(prompts) for t in (0.0, 1.0)])
then = sampler.sample([SampleRequest(state=c.state, max_new_tokens=6, temperature=1.0, seed=7 + i)
                       for i, c in enumerate(first)])
result = {"tokens": [[c.token_ids for c in first], [c.token_ids for c in then]],
          "logprobs": [c.logprobs for c in first]}
import numpy as np
from alphallm_jax.utils.distributed import coordinator_array, fetch
result["coordinator"] = coordinator_array(np.array([jax.process_index(), 7])).tolist()
rows = jax.device_put(np.arange(8), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
mixed = fetch({"local": jax.numpy.arange(3), "rows": rows})  # one array on this process, one across both
result["mixed"] = [mixed["local"].tolist(), mixed["rows"].tolist()]
if jax.process_count() > 1:
    try:
        sampler.sample([SampleRequest(state=sampler.new_state(prompts[jax.process_index()]), max_new_tokens=4)])
    except RuntimeError as e:
        result["diverged"] = str(e)
    # The same request on both, but process 1's pool holds the state in another slot (its LRU drifted).
    kept = first[1].state
    if jax.process_index() == 1:
        pool = sampler.pool
        slot = pool._free.pop()
        pool._lru[slot] = pool._lru.pop(kept.slot)
        kept.slot = slot
    try:
        sampler.sample([SampleRequest(state=kept, max_new_tokens=4)])
    except RuntimeError as e:
        result["diverged_slots"] = str(e)
with open(os.path.join(out, f"{jax.process_index()}-of-{jax.process_count()}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
@pytest.mark.parametrize("chunk_slots", [-1, 16])
def test_two_processes_sample_in_lockstep_on_a_mesh_spanning_both(tmp_path, chunk_slots):
    """On a mesh over both processes' devices every process makes each device call with the same requests
    and reads back the whole batch: both get one process's tokens on the same mesh (new and continued
    states). A process asking for something else is stopped with an error on both, not left to deadlock
    or to mix its rows into the other's batch. Host results that may differ between hosts (timed checks)
    are process 0's on both (`coordinator_array`); `fetch` gathers only the arrays that span processes."""
    import numpy as np

    (checkpoint, _) = _tiny_checkpoints(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text(LOCKSTEP_PROBE)
    args = [str(probe), str(checkpoint), str(tmp_path), str(chunk_slots)]
    one = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=subprocess_env() | {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["bash", str(LOCAL), "--num_processes=2", "--devices_per_process=4",
                          f"--log_dir={tmp_path / 'logs'}", "--", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=subprocess_env() | {"ALPHALLM_CMD": sys.executable})
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert two.returncode == 0, two.stderr[-3000:] + logs[-3000:]
    single, *pair = (json.loads((tmp_path / name).read_text()) for name in ("0-of-1.json", "0-of-2.json", "1-of-2.json"))
    assert pair[0]["logprobs"] == pair[1]["logprobs"]  # the same gathered arrays on both
    for res in pair:
        assert res["tokens"] == single["tokens"]
        for a, b in zip(res["logprobs"], single["logprobs"]):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert "processes sampling on one mesh diverged" in res["diverged"]
        assert "processes sampling on one mesh diverged" in res["diverged_slots"]
    assert all(len(t) > 0 for t in single["tokens"][0])
    for res in (single, *pair):  # process 0's array everywhere; a tree of local and global arrays gathered
        assert res["coordinator"] == [0, 7] and res["mixed"] == [[0, 1, 2], list(range(8))]


def test_local_launcher_sets_the_distributed_environment(tmp_path):
    probe = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in ('ALPHALLM_COORDINATOR', "
             "'ALPHALLM_NUM_PROCESSES', 'ALPHALLM_PROCESS_ID', 'JAX_PLATFORMS', 'JAX_NUM_CPU_DEVICES')}))")
    env = subprocess_env() | {"ALPHALLM_CMD": f"{sys.executable} -c"}
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
    # The process that fails first is the one reported, and the others are stopped then, not awaited:
    # process 0 would run for 60 s.
    start = time.monotonic()
    first = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path}", "--",
                            "import os, sys, time; p = int(os.environ['ALPHALLM_PROCESS_ID']); "
                            "time.sleep(60 if p == 0 else 0.5); sys.exit(5)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 5 and "process 1 exited with status 5" in first.stderr
    assert time.monotonic() - start < 30
    usage = subprocess.run(["bash", str(LOCAL), "--", "eval"], cwd=REPO, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "alphallm").exists(), reason="no .venv in the checkout")
def test_local_launcher_runs_the_checkouts_venv_without_an_activated_environment(tmp_path):
    """After the quickstart (.venv installed, not activated) `launch/local.sh -- CMD` works as the README
    writes it: the launcher finds the checkout's .venv/bin/alphallm, not a system python without JAX."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(LOCAL), "--num_processes=2", f"--log_dir={tmp_path}", "--", "--help"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: alphallm SUBCOMMAND" in out.stdout and "usage: alphallm SUBCOMMAND" in (
        tmp_path / "process_1.log").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
def test_counters_are_summed_over_processes(tmp_path):
    """`sum_over_processes` (the search summary's sampler and backend counters): every host's own counts
    add up on every host."""
    probe = ("import json, os; from alphallm_jax.utils.distributed import maybe_initialize_distributed, "
             "sum_over_processes; maybe_initialize_distributed(); i = int(os.environ['ALPHALLM_PROCESS_ID']); "
             "print(json.dumps(sum_over_processes({'tokens': 10 ** i, 'calls': 3 + i})))")
    env = subprocess_env() | {"ALPHALLM_CMD": f"{sys.executable} -c"}
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
    env = subprocess_env() | {"PATH": str(bin_dir)}  # the launcher needs nothing but bash builtins and gcloud
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
    # A checkout path with a space is quoted for the remote shell; a leading ~/ stays the remote home.
    for repo, cd in (("/opt/my runs/a", "cd /opt/my\\ runs/a && "), ("~/my repo", "cd ~/my\\ repo && ")):
        spaced = subprocess.run([bash, str(tpu_pod), "--tpu=pod-a", "--zone=z", f"--repo={repo}", "--", "eval"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert spaced.returncode == 0, spaced.stderr
        remote = next(a for a in json.loads(record.read_text()) if a.startswith("--command="))
        assert remote.removeprefix("--command=").startswith(cd), remote

    usage = subprocess.run([bash, str(tpu_pod), "--zone=z", "--", "eval"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr
    no_gcloud = subprocess.run([bash, str(tpu_pod), "--tpu=t", "--zone=z", "--", "eval"], cwd=REPO,
                               env=env | {"PATH": str(tmp_path / "empty")}, capture_output=True, text=True, timeout=60)
    assert no_gcloud.returncode == 2 and "gcloud is not installed" in no_gcloud.stderr
