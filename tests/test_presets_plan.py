"""Every config file and variant loads into the locked schema; `alphallm plan` sizes every paper preset
abstractly, with the published parameter counts, and they fit the devices their variants name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alphallm_jax.paper_presets import MESHES_7B, MESHES_70B
from tests.helpers import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = {
    "llama2_7b_gsm8k": MESHES_7B,
    "mistral_7b_gsm8k": MESHES_7B,
    "llama3_8b_instruct_math": MESHES_7B,
    "llama2_70b_gsm8k": MESHES_70B,
}
OTHER_CONFIGS = {"demo_arith": (None, "quick"), "gsm8k_eval": (None, "small"), "math_eval": (None,)}
# Published sizes (HF configs): Llama-2-7B 6.74B, Mistral-7B-v0.1 7.24B, Llama-3-8B 8.03B, Llama-2-70B 68.98B.
PARAMS = {"llama2_7b": 6_738_415_616, "mistral_7b": 7_241_732_096, "llama3_8b": 8_030_261_248,
          "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192}


def _all_configs():
    for name, variants in PAPER_PRESETS.items():
        for v in (None, *variants):
            yield name, v
    for name, variants in OTHER_CONFIGS.items():
        for v in variants:
            yield name, v


def test_every_config_file_is_covered():
    assert {p.stem for p in (REPO / "configs").glob("*.py")} == set(PAPER_PRESETS) | set(OTHER_CONFIGS)


@pytest.mark.parametrize("name,variant", list(_all_configs()))
def test_config_and_variant_load_into_their_consumers(name, variant):
    from alphallm_jax.config import unknown_config_keys
    from alphallm_jax.pipeline.search_run import SearchSettings
    from alphallm_jax.synthesis import SynthesisSettings
    from alphallm_jax.train.pairs import check_pair_margin
    from alphallm_jax.train.trainer import TrainConfig

    c = load_config(name, variant)
    assert unknown_config_keys(c) == []
    c.lock()
    with pytest.raises(AttributeError):
        c.model.chekpoint = "x"  # the schema is locked: a typo fails
    search = SearchSettings.from_config(c)
    # Every config's pair margin can be exceeded on its search's Q scale (else CPL gets no pair).
    check_pair_margin(c.policy_train.tau, search.mcts, c.policy_train.complete_value_field)
    SynthesisSettings.from_config(c.synthesis)
    from types import SimpleNamespace

    from alphallm_jax.pipeline.loop import check_train_batches, trained_sections

    for key in trained_sections(c):
        TrainConfig.from_config(c[key.split(".")[0]][key.split(".")[1]])
    # The loop's check before its first stage, the trainer's on the config's mesh (DPO's microbatch
    # counts pairs): every training stage starts.
    check_train_batches(c, SimpleNamespace(shape={"data": c.mesh.data, "fsdp": c.mesh.fsdp}))


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_preset_hyperparameters(name):
    c = load_config(name, None)
    assert c.model.dtype == c.model.param_dtype == "bfloat16" and c.model.preset
    sft, dpo = c.policy_train.sft, c.policy_train.dpo
    assert (sft.learning_rate, sft.end_learning_rate, sft.warmup_ratio, sft.batch_size) == (5e-6, 1e-6, 0.1, 128)
    assert sft.epochs <= 3 and dpo.batch_size == 64
    assert (c.policy_train.alpha, c.policy_train.ordering) == (0.5, "cpl")
    # Half the [0, 1] range of a complete trajectory's Q (its ORM: the paper's terminal reward) and of every
    # Q under CPL's value-only search; importance-weighted expansion can widen a node (alpha 10, not 1).
    from alphallm_jax.pipeline.search_run import mcts_config_from

    assert c.policy_train.tau == 0.5
    assert mcts_config_from(c.search.mcts).widens and c.search.mcts.alpha == 10.0
    assert c.search.mcts.preset in ("gsm8k_small", "gsm8k_large", "math")
    assert c.critics.dev_split.endswith("train_dev")  # calibration on a held-out tail, never a test split
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(name, "v4-8")


def _plan(name, variant=None):
    from alphallm_jax.pipeline.plan import make_plan

    return make_plan(load_config(name, variant))


@pytest.mark.parametrize("name,policy", [("llama2_7b_gsm8k", "llama2_7b"), ("mistral_7b_gsm8k", "mistral_7b"),
                                         ("llama3_8b_instruct_math", "llama3_8b")])
def test_plan_7b_presets(name, policy):
    plan = _plan(name)
    models = plan["models"]
    assert set(models) == {"policy", "critic"}  # CPL: value-guided search, no fast rollouts
    assert models["policy"]["param_count"] == PARAMS[policy]
    assert models["critic"]["param_count"] > PARAMS[policy]  # the policy's backbone plus three heads
    assert plan["mesh"]["devices"] == 4 and plan["mesh"]["device_memory_bytes"] == 95 * 1024 ** 3
    for m in models.values():
        b = m["per_device_bytes"]
        assert set(b) == {"params", "optimizer", "gradients", "kv_pool", "activations"}
        assert m["fits"] is True and m["devices"] == 4
    p = models["policy"]["per_device_bytes"]
    # bf16 parameters split 4 ways; AdamW moments plus an fp32 master copy: 12 bytes per parameter.
    assert p["params"] == pytest.approx(PARAMS[policy] * 2 / 4, rel=0.01)
    assert p["optimizer"] == pytest.approx(PARAMS[policy] * 12 / 4, rel=0.01)
    assert p["kv_pool"] > 0 and models["critic"]["per_device_bytes"]["kv_pool"] == 0
    assert all(s["fits"] for s in plan["stages"].values())


def test_plan_70b_preset_every_variant():
    plans = {v: _plan("llama2_70b_gsm8k", v) for v in ("v5p-128", "gpu-64", "v5e-256")}
    models = plans["v5p-128"]["models"]
    assert models["policy"]["param_count"] == PARAMS["llama2_70b"]
    assert models["rollout_policy"]["param_count"] == PARAMS["llama2_7b"]
    assert models["critic"]["param_count"] - PARAMS["llama2_13b"] < 10 ** 7  # Llama-2-13B plus heads
    assert not models["rollout_policy"]["trained"] and models["rollout_policy"]["per_device_bytes"]["optimizer"] == 0
    assert all(m["fits"] for m in models.values())
    assert plans["gpu-64"]["mesh"]["devices"] == 64 and all(m["fits"] for m in plans["gpu-64"]["models"].values())
    # The critic data's sampler keeps states: its pool is sized for the mesh like the search's (4,096
    # slots of a 7B policy's states were 1.3 TB).
    assert all(p["stages"]["critic_data"]["fits"] and p["stages"]["search"]["fits"] for p in plans.values())
    # v5e: 16 GiB chips hold the policy's train step only with per-layer rematerialisation, which the
    # preset sets for the sections that need it and nowhere else (it costs compute).
    v5e = plans["v5e-256"]
    assert v5e["stages"]["search"]["fits"] and v5e["models"]["policy"]["fits"]
    detail = v5e["models"]["policy"]["activations_detail"]
    assert detail["remat"] == "full" and detail["full_remat_bytes"] == v5e["models"]["policy"]["per_device_bytes"][
        "activations"]
    v5e_cfg = load_config("llama2_70b_gsm8k", "v5e-256")
    assert v5e_cfg.policy_train.sft.remat and v5e_cfg.policy_train.dpo.remat and not v5e_cfg.critics.train.remat
    assert plans["v5p-128"]["models"]["policy"]["activations_detail"]["remat"] == "none"
    assert not load_config("llama2_70b_gsm8k", "v5p-128").policy_train.sft.remat


def test_plan_of_the_demo_matches_its_models():
    plan = _plan("demo_arith")
    cfg = load_config("demo_arith", None)
    m, vocab = cfg.base.model, cfg.base.tokenizer_vocab_size
    attention = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o; k, v
    layer = attention + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
    tied_embedding = vocab * m.hidden_size
    assert plan["models"]["policy"]["param_count"] == m.num_layers * layer + m.hidden_size + tied_embedding
    assert plan["models"]["policy"]["source"] == "config sizes"
    assert set(plan["models"]) == {"policy", "critic", "rollout_policy"}
    assert plan["models"]["rollout_policy"]["trained"]
    # The demo's critic starts from the fast-rollout policy: its backbone, plus the heads.
    assert cfg.critics.model.init == "rollout_policy"
    critic = plan["models"]["critic"]
    h, d = cfg.critics.model.head_hidden, cfg.rollout_policy.model.hidden_size
    heads = 3 * (d * h + h + h + 1)  # value, PRM and ORM heads: d -> hidden -> 1, with biases
    assert critic["source"].startswith("rollout policy")
    assert critic["param_count"] == plan["models"]["rollout_policy"]["param_count"] + heads


def test_plan_command_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "plan",
                           "--config", str(REPO / "configs" / "mistral_7b_gsm8k.py:gpu-8"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "policy" in proc.stdout and "fits" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["models"]["policy"]["param_count"] == PARAMS["mistral_7b"]
    assert plan["models"]["policy"]["devices"] == 8 and plan["models"]["policy"]["fits"] is True


def test_command_line_overrides_of_a_presets_mesh_size_it_again(tmp_path):
    """A preset's accumulation, remat and KV pools are sized for its variant's mesh at load; the CLI sizes
    them again after the overrides (here the 70B's `:v5p-128` on half its fsdp axis, which is `:v5p-64`),
    except the keys an override set itself, and names a mesh the batches cannot split over."""
    from alphallm_jax.paper_presets import SIZED_KEYS, resize_after_overrides, size_for_mesh

    out, flagfile = tmp_path / "plan.json", tmp_path / "flags.txt"
    spec = str(REPO / "configs" / "llama2_70b_gsm8k.py:v5p-128")
    flagfile.write_text("--config.search.pool_slots=1000\n")
    # Overrides in every form absl parses: `--config.a=v`, a flag file, a negated boolean.
    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "plan", "--config", spec, "--config.mesh.fsdp=8",
                           f"--flagfile={flagfile}", "--noconfig.policy_train.dpo.remat", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(out.read_text())
    v5p_64 = load_config("llama2_70b_gsm8k", "v5p-64")
    assert not load_config("llama2_70b_gsm8k", "v5p-128").policy_train.sft.remat and v5p_64.policy_train.sft.remat
    assert plan["train_steps"]["sft"] == {"sequences_per_device": 1, "seq_len": 1536, "remat": True,
                                          "grad_accum_steps": v5p_64.policy_train.sft.grad_accum_steps}  # sized again
    assert plan["train_steps"]["dpo"]["remat"] is False  # as the command line set it
    assert "train steps (sequences per device x accumulation steps): sft 1 x 16 of 1536 tokens (remat)" in proc.stdout
    assert plan["stages"]["policy_training"]["fits"] is False  # DPO's step needs it: the plan says so
    assert plan["pools"]["search"]["slots"] == 1000  # the override's own value stays
    assert plan["pools"]["critic_data"]["slots"] == v5p_64.critics.data.pool_slots

    # In process: what the CLI calls. Sizing again without an override changes nothing; the demo
    # (no `mesh.micro_batch`) is never sized.
    cfg = load_config("llama2_70b_gsm8k", "v5p-128")
    before = cfg.to_dict()
    assert resize_after_overrides(cfg, ["loop.iterations"], "x") == list(SIZED_KEYS)
    assert cfg.to_dict() == before
    demo = load_config("demo_arith", None)
    demo.mesh.fsdp = 2
    assert resize_after_overrides(demo, ["mesh.fsdp"], "x") == [] and demo.search.pool_slots == 2048
    cfg.mesh.fsdp, cfg.policy_train.sft.grad_accum_steps = 8, 2
    size_for_mesh(cfg, "x", keep=("policy_train.sft.grad_accum_steps",))
    assert cfg.policy_train.sft.grad_accum_steps == 2 != v5p_64.policy_train.sft.grad_accum_steps
    assert cfg.policy_train.dpo.grad_accum_steps == v5p_64.policy_train.dpo.grad_accum_steps

    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "plan", "--config", spec, "--config.mesh.fsdp=7"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "llama2_70b_gsm8k.py:v5p-128 with the command line's overrides: batch_size 128 does not divide over " \
           "data*fsdp = 7 devices" in proc.stderr


def test_held_out_dev_tails_are_disjoint_from_the_critics_training_prompts():
    from alphallm_jax.data.loaders import HELD_OUT_DEV, load_dataset, resolve_data_dir

    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("no data directory")
    for name in ("llama2_7b_gsm8k", "llama3_8b_instruct_math"):
        c = load_config(name, None)
        train = load_dataset(c.critics.train_split, limit=c.critics.num_train_prompts)
        dev = load_dataset(c.critics.dev_split, limit=c.critics.num_dev_prompts)
        assert len(dev) == HELD_OUT_DEV and not {p.id for p in train} & {p.id for p in dev}
        assert dev == load_dataset(c.critics.train_split)[-HELD_OUT_DEV:]


@pytest.mark.parametrize("command, args, named", [
    ("plan", ["--config", "configs/demo_arith.py", "--config.base.train.max_stps=3"],
     ["--config.base.train.max_stps", "'max_stps'", "valid keys of config.base.train: adam_b1,"]),
    ("plan", ["--config=configs/demo_arith.py:quick", "--config.base.trian.epochs=1"],
     ["--config.base.trian.epochs", "'trian'", 'Did you mean "train"', "valid keys of config.base: dev_split,"]),
    # train-base has a default config, whose overrides absl parses while the flags are defined.
    ("train-base", ["--workdir", "unused", "--config.bse=1"],
     ["--config.bse", 'Did you mean "base"', "valid keys of config: base, critics,"]),
])
def test_config_override_typo_names_the_override_and_the_valid_keys(command, args, named):
    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", command, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for text in named:
        assert text in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, named", [
    (["loop", "--config=configs/demo_arith.py:quick", "--workdir=gs://bucket/run"], "--workdir=gs://bucket/run"),
    (["eval", "--config=configs/gsm8k_eval.py", "--workdir=unused", "--config.model.checkpoint=gs://b/llama"],
     "model.checkpoint=gs://b/llama"),
    (["sweep", "--config=configs/demo_arith.py", "--workdir=unused", "--config.sweep.checkpoints=('base=gs://b/p',)"],
     "sweep.checkpoints=base=gs://b/p"),
])
def test_a_bucket_url_for_a_checkpoint_or_workdir_is_refused_with_the_mount_advice(args, named):
    # orbax, safetensors and SentencePiece write through the filesystem: a gs:// workdir became ./gs:/...
    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert named in proc.stderr and "gcsfuse" in proc.stderr, proc.stderr


def test_url_paths_read_sweep_names_only_in_sweep_checkpoints():
    from alphallm_jax.config import default_config
    from alphallm_jax.utils.io import url_paths

    c = default_config()
    c.model.checkpoint = "gs://b/x=y"  # an "=" in a bucket path is no NAME=DIR
    c.sweep.checkpoints = ("gs://b/run=1/policy", "base=gs://b/p", "local=/tmp/a", "/tmp/b")
    assert url_paths("runs/x", c) == ["model.checkpoint=gs://b/x=y", "sweep.checkpoints=gs://b/run=1/policy",
                                      "sweep.checkpoints=base=gs://b/p"]
    assert url_paths("gs://b/run", None) == ["--workdir=gs://b/run"]


def test_config_file_typo_is_named_with_the_valid_keys(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from alphallm_jax.config import default_config\n\n\ndef get_config():\n"
                    "    c = default_config()\n    c.loop.iteratons = 3\n    c.base.train.lr = 1.0\n"
                    "    c.base.train.max_steps = 5  # a TrainConfig field: fine\n    return c\n")
    proc = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "plan", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for text in (str(path), "config.loop.iteratons is not a field", "valid keys of config.loop: ablation_orderings",
                 "config.base.train.lr is not a field", "adam_b1"):
        assert text in proc.stderr, proc.stderr
    assert "max_steps is not" not in proc.stderr


def test_load_config_file_reads_variants_and_names_typos_and_missing_files(tmp_path):
    import runpy

    from alphallm_jax.config import load_config_file

    get_config = runpy.run_path(str(REPO / "configs" / "demo_arith.py"))["get_config"]
    assert load_config_file(str(REPO / "configs" / "demo_arith.py:quick")).to_dict() == get_config("quick").to_dict()
    assert load_config_file(str(REPO / "configs" / "demo_arith.py")).to_dict() == get_config().to_dict()
    assert get_config().eval.limit != get_config("quick").eval.limit
    path = tmp_path / "typo.py"
    path.write_text("from alphallm_jax.config import default_config\n\n\ndef get_config():\n"
                    "    c = default_config()\n    c.loop.iteratons = 3\n    return c\n")
    with pytest.raises(ValueError, match=r"typo\.py: config\.loop\.iteratons is not a field \(valid keys"):
        load_config_file(str(path))
    assert load_config_file(str(path), check_keys=False).loop.iteratons == 3
    with pytest.raises(FileNotFoundError, match="config file .*nothing.py does not exist"):
        load_config_file(str(tmp_path / "nothing.py"))
    (tmp_path / "plain.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="plain.py defines no get_config"):
        load_config_file(str(tmp_path / "plain.py"))
    (tmp_path / "none.py").write_text("def get_config():\n    return None\n")
    with pytest.raises(ValueError, match="none.py: get_config returned NoneType, not a ConfigDict"):
        load_config_file(str(tmp_path / "none.py"))


def test_plan_reports_a_batch_that_cannot_split_over_an_overridden_mesh():
    """A mesh override leaves the variant's accumulation in place: plan says which stages the trainer
    would refuse and which grad_accum_steps would do, and the model does not fit whatever its bytes."""
    from alphallm_jax.pipeline.plan import format_plan, make_plan

    c = load_config("mistral_7b_gsm8k", "gpu-8")
    assert make_plan(c)["problems"] == []
    c.mesh.fsdp = 64
    plan = make_plan(c)
    assert plan["models"]["policy"]["fits"] is False and plan["stages"]["policy_training"]["fits"] is False
    assert any("dpo training" in p and "use grad_accum_steps one of [1]" in p for p in plan["problems"])
    assert "PROBLEM policy: sft training" in format_plan(plan)
    c.policy_train.sft.grad_accum_steps = c.critics.train.grad_accum_steps = 2
    c.policy_train.dpo.grad_accum_steps = 1
    assert make_plan(c)["problems"] == []


def test_command_help_lists_the_commands_flags_and_training_fields_are_settable():
    """`alphallm CMD --help` exits 0 listing the command's own flags; every TrainConfig field of a
    training section can be set on the command line, not only in a config file; a missing config file
    is one line and exit code 2, from any directory."""
    run = lambda *args, cwd=REPO: subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args],  # noqa: E731
                                                 capture_output=True, text=True, cwd=cwd, timeout=300)
    help_ = run("bench", "sampler", "--help")
    assert help_.returncode == 0 and "--batch_sizes" in help_.stdout and "--xla_cpu_flags" in help_.stdout
    policy = run("train-policy", "--help")
    assert policy.returncode == 0 and "--train.method" in policy.stdout and "--workdir" in policy.stdout
    plan = run("plan", "--config=configs/demo_arith.py:quick", "--config.base.train.grad_accum_steps=2",
               "--config.base.train.max_steps=3", "--config.policy_train.dpo.compute_dtype=bfloat16")
    assert plan.returncode == 0, plan.stderr[-2000:]
    missing = run("plan", "--config=configs/nope.py")
    assert missing.returncode == 2 and "no config file at configs/nope.py" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_run_on_devices_that_give_jax_less_than_the_plan_is_refused(monkeypatch):
    """llama3-8B on `:gpu-8` fills its search and critic-data stages to 64 GiB of 80; a GPU whose allocator
    gives JAX its default 75% (60 GiB) fails that hours in. The loop's preflight refuses it, naming the
    stages and XLA_PYTHON_CLIENT_MEM_FRACTION; with .92 (73.6 GiB) it passes; CPU devices are not checked;
    a TPU that gives less than the plan's stages is refused too (no setting raises its limit)."""
    import types

    import jax

    from alphallm_jax.pipeline.plan import GIB, SKIP_MEMORY_CHECK_ENV, check_device_memory

    c = load_config("llama3_8b_instruct_math", "gpu-8")
    check_device_memory(c)  # CPU devices are not checked: mesh.hbm_gib describes the target hardware

    def device(platform, limit_gib, kind="NVIDIA H100 80GB HBM3"):
        stats = {"bytes_limit": int(limit_gib * GIB)}
        d = types.SimpleNamespace(platform=platform, device_kind=kind, memory_stats=lambda: stats)
        monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [d])

    device("gpu", 0.75 * 80)
    with pytest.raises(ValueError, match=r"search stage 64\.0 GiB, critic_data stage 64\.0 GiB, .*policy_training "
                                         r"stage 61\.6 GiB.*gives JAX 60\.0 GiB here: set "
                                         r"XLA_PYTHON_CLIENT_MEM_FRACTION above 0\.80"):
        check_device_memory(c)
    device("gpu", 0.92 * 80)
    check_device_memory(c)
    device("tpu", 40, "TPU v5")
    with pytest.raises(ValueError, match=r"TPU v5 gives JAX 40\.0 GiB here.*ALPHALLM_SKIP_MEMORY_CHECK=1"):
        check_device_memory(c)
    monkeypatch.setenv(SKIP_MEMORY_CHECK_ENV, "1")
    check_device_memory(c)  # on the user's word


def test_a_plan_that_does_not_fit_is_refused_before_the_loop_starts(monkeypatch):
    """llama2-70B on `:v5e-256` without rematerialisation holds the search in 16 GiB chips but not the
    policy's train step: a TPU run is refused at start, naming it, rather than at the first SFT round. A
    resumed run is not checked for the stages it finished (the critic's, here)."""
    import types

    import jax

    from alphallm_jax.pipeline.loop import finished_plan_stages
    from alphallm_jax.pipeline.plan import GIB, check_device_memory

    c = load_config("llama2_70b_gsm8k", "v5e-256")
    c.policy_train.sft.remat = c.policy_train.dpo.remat = False  # what the preset sets: without it
    d = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", memory_stats=lambda: {"bytes_limit": 16 * GIB})
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [d])
    with pytest.raises(ValueError, match=r"mesh\.hbm_gib=16\.0 does not hold policy_training stage 45\.1 GiB per "
                                         r"device .*: shrink policy_train\.sft/dpo grad_accum_steps or max_seq_len"):
        check_device_memory(c)
    skip = finished_plan_stages(c, lambda stage: stage == "critics_stage")
    assert skip == ("critic_data", "critic_training") and finished_plan_stages(c) == ()
    stages = set(_plan("llama2_70b_gsm8k", "v5e-256")["stages"]) | set(_plan("demo_arith")["stages"])
    c.loop.iterations = 0
    every = finished_plan_stages(c, lambda stage: True)
    assert set(every) <= stages and "policy_training" in every  # the plan's own names: a rename fails here
    # A loop without iterations never trains the loaded policy: search and evaluation fit, so it runs.
    c.model.checkpoint = "/checkpoints/llama-2-70b-hf"
    check_device_memory(c, skip=finished_plan_stages(c))
    c.loop.iterations = 2
    # Chips that hold the train step, and a critic-data pool too large for them: refused until it finished.
    c.mesh.hbm_gib = 52.0
    monkeypatch.setattr(d, "memory_stats", lambda: {"bytes_limit": 52 * GIB})
    c.critics.data.pool_slots *= 20
    with pytest.raises(ValueError, match=r"does not hold critic_data stage"):
        check_device_memory(c)
    check_device_memory(c, skip=skip)


@pytest.mark.parametrize("name,variant", [("llama2_7b_gsm8k", "v5p-8"), ("llama2_7b_gsm8k", "v5e-32"),
                                          ("llama3_8b_instruct_math", "gpu-8"), ("llama2_70b_gsm8k", "v5p-64")])
def test_preset_pools_fill_their_stages_to_the_planned_share_of_memory(name, variant):
    """The state-keeping samplers' pools take what the plan leaves of the devices' memory: each stage
    ends within one slot per (data, fsdp) shard of `POOL_FILL_FRACTION`, and every pool holds at least
    one batch of its stage's rows (llama2-7B's 32 KV heads on `:v5p-8` once sat at 64 slots below its
    128-row batches, so every round evicted and rebuilt states): a pool held at that floor goes past the
    fill share but still fits."""
    from alphallm_jax.pipeline.plan import FIT_FRACTION, POOL_FILL_FRACTION, fill_kv_pools, make_plan

    cfg = load_config(name, variant)
    plan = make_plan(cfg)
    dp = cfg.mesh.data * cfg.mesh.fsdp
    hbm = plan["mesh"]["device_memory_bytes"]
    for stage, slots, batch in (("search", cfg.search.pool_slots, cfg.search.max_batch),
                                ("critic_data", cfg.critics.data.pool_slots, cfg.sampling.max_batch)):
        floor = -(-(batch + 1) // dp) * dp  # a batch's states beside the empty slot
        assert slots % dp == 0 and slots >= floor, (stage, slots)
        used = plan["stages"][stage]["per_device_bytes"]
        assert used <= (POOL_FILL_FRACTION if slots > floor else FIT_FRACTION) * hbm
        cfg2 = load_config(name, variant)
        (cfg2.search if stage == "search" else cfg2.critics.data).pool_slots = slots + dp
        assert make_plan(cfg2)["stages"][stage]["per_device_bytes"] > POOL_FILL_FRACTION * hbm  # one more is too many
    assert fill_kv_pools(cfg) == {"search": cfg.search.pool_slots, "critic_data": cfg.critics.data.pool_slots}
    assert plan["pools"]["search"] == {"slots": cfg.search.pool_slots, "tokens_per_slot": cfg.search.max_len
                                       or cfg.sampling.max_len, "batch_rows": cfg.search.max_batch,
                                       "fill_slots": cfg.search.pool_slots}


def test_plan_notes_a_pool_smaller_than_its_batch():
    from alphallm_jax.pipeline.plan import format_plan, make_plan

    cfg = load_config("llama2_7b_gsm8k", "v5p-8")
    assert "NOTE" not in format_plan(make_plan(cfg))
    cfg.search.pool_slots = 64  # an override below the 128-row batches
    text = format_plan(make_plan(cfg))
    assert "KV pools: search 64 slots, critic data 232 slots of 1024 tokens (filling 80% of the memory: 132, 232)" in text
    assert "NOTE the search pool (64 slots) holds fewer states than one batch (128 rows)" in text
    assert "does not split" not in text
    cfg.mesh.fsdp = 16  # a mesh override: 232 slots do not split over 16 devices
    assert "NOTE the critic data pool (232 slots) does not split over data x fsdp = 16" in format_plan(make_plan(cfg))


def test_the_plans_working_caches_cover_the_samplers_row_programs():
    """Beside its pool the plan counts `WORKING_BATCHES` caches of a sampler's batch rows: what XLA's
    compiled programs hold at once when a batch forks from its prefilled unique rows and when its rows
    are stored into the (donated) pool, never more, and more than one batch (the plan once counted one)."""
    import jax
    import jax.numpy as jnp

    from alphallm_jax.models.config import ModelConfig
    from alphallm_jax.models.kv_cache import KVCache
    from alphallm_jax.pipeline.plan import WORKING_BATCHES
    from alphallm_jax.sampling import engine, kv_pool

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    batch, unique, slots = 16, 15, 64

    def cache(rows):
        return KVCache.create(cfg, rows, 128)

    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    def held(program, *args):  # bytes live at once: inputs, outputs not written in place, temporaries
        m = program.lower(*args).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    batch_bytes, pool = nbytes(cache(batch)), cache(slots)
    rows_b = jnp.zeros(batch, jnp.int32)
    logits = (unique + batch) * cfg.vocab_size * 4
    fork = held(engine.fork_rows, cache(unique), jnp.zeros((unique, cfg.vocab_size)), rows_b) - logits
    store = held(kv_pool._store_rows, pool, rows_b, cache(batch), rows_b) - nbytes(pool)
    small = 1024  # the row indices and XLA's tuple bookkeeping
    for working in (fork, store):
        assert (WORKING_BATCHES - 1) * batch_bytes < working <= WORKING_BATCHES * batch_bytes + small


def test_the_plans_train_activations_are_within_a_quarter_of_xlas_working_memory():
    """`train_activation_bytes` (plus remat's stacked copies) against XLA's compiled working memory of a
    cross-entropy gradient, with and without remat, at two shapes: within 25% either way (measured:
    1,120 / 948 and 352 / 422 MiB at 8 x 256 tokens; 1,526 / 1,714 and 257 / 307 at 4 x 512, 16 layers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from alphallm_jax.models.config import ModelConfig
    from alphallm_jax.models.creation import create_model
    from alphallm_jax.pipeline.plan import TrainShape, train_activation_bytes

    base = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                num_kv_heads=4, head_dim=64, max_position_embeddings=1024)
    deep = dict(base, num_layers=16, hidden_size=256, head_dim=32, intermediate_size=704)
    for sizes, rows, seq in ((base, 8, 256), (deep, 4, 512)):
        ids = jnp.asarray(np.random.default_rng(0).integers(3, 4000, (rows, seq)), jnp.int32)
        for remat in (False, True):
            cfg = ModelConfig(**sizes, remat=remat)
            graphdef, params = nnx.split(create_model(cfg, seed=0), nnx.Param)

            def loss(p, graphdef=graphdef, ids=ids):
                logits = nnx.merge(graphdef, p)(ids)
                return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1).mean()

            grad = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
            stacked = 2 * sum(x.nbytes for x in jax.tree.leaves(params)) if remat else 0
            planned = stacked + train_activation_bytes(cfg, TrainShape("sft", rows, seq, "float32", "float32"), 1,
                                                       lm_head=True, remat="full" if remat else "none")
            measured = grad.memory_analysis().temp_size_in_bytes
            assert 0.75 <= measured / planned <= 1.25, (sizes["num_layers"], remat, measured, planned)
