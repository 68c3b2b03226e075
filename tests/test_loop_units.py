"""The loop's bookkeeping: stage skipping and resumption, config derivation, the report writer."""

import json
import types

import pytest

from alphallm_jax.config import default_config
from alphallm_jax.pipeline.loop import (
    LoopRun,
    _ablations,
    _fast_rollout_policy,
    _iteration_cpl_run,
    _next_policy_stage,
    _sft_plan,
    check_resumed_config,
    derived_config,
    same_weights,
    sft_inputs,
)
from alphallm_jax.pipeline.loop_report import find_method, markdown, write_report
from alphallm_jax.pipeline.sweep import loop_checkpoints
from alphallm_jax.utils.io import as_path, rebase_paths


def test_derived_config_overrides_a_copy_and_rejects_unknown_keys():
    cfg = default_config()
    out = derived_config(cfg, **{"model.checkpoint": "/ckpt", "policy_train.ordering": "shuffle"})
    assert out.model.checkpoint == "/ckpt" and out.policy_train.ordering == "shuffle"
    assert cfg.model.checkpoint == "" and cfg.policy_train.ordering == "cpl"
    with pytest.raises(KeyError, match="model.chekpoint"):
        derived_config(cfg, **{"model.chekpoint": "/x"})


def test_stage_runs_once_and_a_failed_stage_runs_again(tmp_path):
    calls = []
    run = LoopRun(cfg=default_config(), root=as_path(tmp_path), log=lambda s: calls.append(("log", s)))

    def ok(stage_dir):
        calls.append("ok")
        (stage_dir / "artifact.txt").write_text("x")
        return {"value": 3}

    assert run.stage("a/b", ok)["value"] == 3
    assert run.stage("a/b", ok)["value"] == 3
    assert calls.count("ok") == 1
    assert (tmp_path / "a/b/DONE").exists() and json.loads((tmp_path / "a/b/stage.json").read_text())["record"]["value"] == 3

    def boom(stage_dir):
        calls.append("boom")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.stage("c", boom)
    assert not (tmp_path / "c/DONE").exists()
    assert run.stage("c", ok)["value"] == 3  # the rerun does the stage
    # Stage times: this run's, and a finished stage's as recorded by the attempt that finished it.
    assert set(run.stage_seconds) == {"a/b", "c"}
    resumed = LoopRun(cfg=default_config(), root=as_path(tmp_path), log=lambda s: None)
    resumed.stage("a/b", boom)
    assert resumed.stage_seconds == {"a/b": run.stage_seconds["a/b"]}

    # A stage whose own work marks its folder DONE (synthesis does) and that is killed before its record
    # is written has not finished: the rerun runs it again.
    def marks_done(stage_dir):
        calls.append("marks_done")
        (stage_dir / "DONE").write_text("")
        raise RuntimeError("killed after the work's own marker")

    with pytest.raises(RuntimeError):
        run.stage("d", marks_done)
    assert (tmp_path / "d/DONE").exists() and not (tmp_path / "d/stage.json").exists()
    assert run.stage("d", ok)["value"] == 3 and calls.count("ok") == 3


def test_rebase_paths_moves_the_old_root_and_what_lies_under_it_only():
    record = {"policy": "/old/run/iter_1/sft/policy", "root": "/old/run", "sibling": "/old/run2/policy",
              "name": "run", "epochs": ["/old/run/e1", "/elsewhere/e2"], "n": 3, "nested": {"p": "/old/run/"}}
    moved = rebase_paths(record, "/old/run", "/new/place")
    assert moved == {"policy": "/new/place/iter_1/sft/policy", "root": "/new/place", "sibling": "/old/run2/policy",
                     "name": "run", "epochs": ["/new/place/e1", "/elsewhere/e2"], "n": 3, "nested": {"p": "/new/place/"}}
    assert rebase_paths(record, None, "/new/place") is record  # a record from before roots were stored
    assert rebase_paths(record, "/old/run/", "/new/place/")["policy"] == "/new/place/iter_1/sft/policy"


def test_a_moved_workdir_resumes_its_finished_stages_with_their_paths_moved(tmp_path):
    old, new = tmp_path / "old", tmp_path / "disk2" / "new"
    run = LoopRun(cfg=default_config(), root=as_path(old), log=lambda s: None)

    def train(stage_dir):
        (stage_dir / "policy").mkdir()
        return {"policy": str(stage_dir / "policy"), "epoch_policies": [str(stage_dir / "policy")]}

    assert run.stage("iter_1/sft", train)["policy"] == str(old / "iter_1/sft/policy")
    new.parent.mkdir()
    old.rename(new)

    def must_not_run(stage_dir):
        raise AssertionError("a finished stage ran again")

    moved = LoopRun(cfg=default_config(), root=as_path(new), log=lambda s: None)
    record = moved.stage("iter_1/sft", must_not_run)
    assert record == {"policy": str(new / "iter_1/sft/policy"), "epoch_policies": [str(new / "iter_1/sft/policy")]}
    assert [c.path for c in loop_checkpoints(new)] == [str(new / "iter_1/sft/policy")]


def test_a_resumed_run_may_extend_the_loop_but_not_change_what_finished_stages_computed(tmp_path):
    path = tmp_path / "config.json"
    cfg = default_config()
    assert check_resumed_config(cfg, path) == []  # a new workdir
    path.write_text(json.dumps(cfg.to_dict()))
    assert check_resumed_config(cfg, path) == []
    longer = derived_config(cfg, **{"loop.iterations": 4, "mesh.data": 2, "loop.ablation_seeds": 1})
    assert check_resumed_config(longer, path) == ["loop.ablation_seeds", "loop.iterations", "mesh.data"]
    # A preset resumed on another mesh: the CLI sizes its microbatches, remat and pools again (the
    # 70B's `:v5p-128` as `:v5p-64`); those change where the run computes, not what.
    from tests.helpers import load_config

    path.write_text(json.dumps(load_config("llama2_70b_gsm8k", "v5p-128").to_dict()))
    resized = load_config("llama2_70b_gsm8k", "v5p-64")
    assert {"mesh.fsdp", "policy_train.sft.remat", "search.pool_slots", "critics.train.grad_accum_steps"} <= set(
        check_resumed_config(resized, path))
    path.write_text(json.dumps(cfg.to_dict()))
    changed = derived_config(cfg, **{"search.mcts.c_uct": 0.3, "eval.methods": ("greedy",), "loop.iterations": 3})
    with pytest.raises(ValueError, match=r"differs in eval\.methods: \['greedy', 'maj@16'\] -> \['greedy'\]; "
                                         r"search\.mcts\.c_uct: .* -> 0\.3\. .*use a new --workdir"):
        check_resumed_config(changed, path)
    # A search field left to its preset (None) and then set to the preset's value is the same search: a
    # run started before a preset set it resumes with the old value set back on the command line.
    assert cfg.search.mcts.alpha is None and cfg.search.mcts.preset == "gsm8k_small"
    assert check_resumed_config(derived_config(cfg, **{"search.mcts.alpha": 1.0}), path) == []
    with pytest.raises(ValueError, match=r"search\.mcts\.alpha: None -> 10\.0"):
        check_resumed_config(derived_config(cfg, **{"search.mcts.alpha": 10.0}), path)


def test_a_resumed_run_accepts_keys_newer_than_it_only_at_their_defaults(tmp_path):
    # A workdir started by older code lacks the keys added since; at their defaults they keep the old
    # behaviour, so resuming is safe, while any other value would change what the remaining stages do.
    path = tmp_path / "config.json"
    cfg = default_config()
    old = cfg.to_dict()
    del old["synthesis"]["form"]["max_number_quantile"], old["loop"]["sft_init"]
    path.write_text(json.dumps(old))
    assert check_resumed_config(cfg, path) == ["loop.sft_init", "synthesis.form.max_number_quantile"]
    with pytest.raises(ValueError, match=r"differs in synthesis\.form\.max_number_quantile: '<absent>' -> 0\.97\."):
        check_resumed_config(derived_config(cfg, **{"synthesis.form.max_number_quantile": 0.97}), path)
    # A key the code has since removed cannot be set back: the message says so instead.
    path.write_text(json.dumps({**old, "loop": {**old["loop"], "retired_knob": 4}}))
    with pytest.raises(ValueError, match=r"no longer has the keys loop\.retired_knob \(the run started with 4\).*"
                                         r"the code the run started with"):
        check_resumed_config(cfg, path)
    # ... except under the keys a resumed run may change anyway (mesh.*, the ablation keys).
    path.write_text(json.dumps({**old, "mesh": {**old["mesh"], "retired_axis": 2}}))
    assert "mesh.retired_axis" in check_resumed_config(cfg, path)


def test_next_policy_names_the_stage_the_next_iteration_starts_from():
    cfg = default_config()
    assert _next_policy_stage(cfg) == "cpl"
    cfg.loop.next_policy = "sft"
    assert _next_policy_stage(cfg) == "sft"
    cfg.loop.next_policy = "dpo"
    with pytest.raises(ValueError, match="loop.next_policy.*'dpo'"):
        _next_policy_stage(cfg)


def test_sft_plan_checks_the_traces_and_the_starting_policy(tmp_path):
    cfg = default_config()
    assert _sft_plan(cfg) == ("iteration", "previous")
    cfg.loop.sft_traces, cfg.loop.sft_init = "accumulated", "base"
    assert _sft_plan(cfg) == ("accumulated", "base")
    run = LoopRun(cfg=cfg, root=as_path(tmp_path), log=lambda s: None)
    assert sft_inputs(run, 3, "/pi_2", "/pi_0") == (
        "/pi_0", ",".join(str(tmp_path / f"iter_{k}" / "search" / "trees") for k in (1, 2, 3)))
    cfg.loop.sft_traces, cfg.loop.sft_init = "iteration", "previous"  # the paper's round
    assert sft_inputs(run, 3, "/pi_2", "/pi_0") == ("/pi_2", str(tmp_path / "iter_3" / "search" / "trees"))
    cfg.loop.sft_traces = "all"
    with pytest.raises(ValueError, match="loop.sft_traces.*'all'"):
        _sft_plan(cfg)
    cfg.loop.sft_traces, cfg.loop.sft_init = "iteration", "pi_0"
    with pytest.raises(ValueError, match="loop.sft_init.*'pi_0'"):
        _sft_plan(cfg)


def test_same_weights_compares_the_weight_files_bytes(tmp_path):
    for name, data in (("a", b"123"), ("b", b"123"), ("c", b"124")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
        (tmp_path / name / "config.json").write_text(name)  # not weights: ignored
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert not same_weights(tmp_path / "a", tmp_path / "c")
    (tmp_path / "b" / "model-2.safetensors").write_bytes(b"")
    assert not same_weights(tmp_path / "a", tmp_path / "b")  # another set of files
    (tmp_path / "empty").mkdir()
    assert not same_weights(tmp_path / "empty", tmp_path / "empty")


def test_the_fast_rollout_policy_is_a_stage_of_its_own_when_the_loop_trains_it(tmp_path, monkeypatch):
    """Trained in its own resumable stage (before the critics, which may start from it), so the critics'
    stage time is theirs; skipped when the search has no fast-rollout policy or is given one."""
    from alphallm_jax.critics import fast_rollout

    calls = []

    def fake_train(cfg, workdir, policy_dir, *, mesh=None):
        calls.append(policy_dir)
        return {"policy": str(workdir / "fast_rollout" / "policy"), "param_count": 7, "steps": 3,
                "best_dev_loss": 0.5}

    monkeypatch.setattr(fast_rollout, "train_fast_rollout_policy", fake_train)
    lines = []
    cfg = default_config()
    run = LoopRun(cfg=cfg, root=as_path(tmp_path), log=lines.append)
    _fast_rollout_policy(run, "/base/policy")  # rollout_policy.enabled is False by default
    assert calls == [] and not (tmp_path / "fast_rollout").exists()
    cfg.rollout_policy.enabled = True
    _fast_rollout_policy(run, "/base/policy")
    _fast_rollout_policy(run, "/base/policy")  # a rerun: done before
    assert calls == ["/base/policy"] and (tmp_path / "fast_rollout" / "DONE").exists()
    assert lines[0].startswith("[fast_rollout] policy ") and "7 parameters, 3 steps" in lines[0]
    assert "fast_rollout" in run.stage_seconds
    cfg.rollout_policy.checkpoint = "/given/fast"
    _fast_rollout_policy(LoopRun(cfg=cfg, root=as_path(tmp_path / "given"), log=lines.append), "/base/policy")
    assert calls == ["/base/policy"]


def test_the_cpl_ordering_run_of_iteration_1s_seed_is_reused_not_trained_again(tmp_path):
    cfg = default_config()
    cfg.policy_train.dpo.seed = 5
    run = LoopRun(cfg=cfg, root=as_path(tmp_path), log=lambda s: None)
    run.stage("iter_1/cpl", lambda d: {"policy": "p", "train_pairs": 12, "epoch_policies": ["e1", "e2"]})
    run.stage("iter_1/eval", lambda d: {"cpl": {}, "cpl_epochs": [_acc(0.25), _acc(0.5)]})
    assert _iteration_cpl_run(run, "cpl", 5) == {"ordering": "cpl", "seed": 5, "epoch_accuracy": [0.25, 0.5],
                                                 "train_pairs": 12, "reused": "iter_1/cpl"}
    assert _iteration_cpl_run(run, "cpl", 6) is None  # another seed: another run
    assert _iteration_cpl_run(run, "shuffle", 5) is None
    untrained = LoopRun(cfg=cfg, root=as_path(tmp_path / "u"), log=lambda s: None)
    untrained.stage("iter_1/cpl", lambda d: {"policy": "p", "untrained": "no pairs", "epoch_policies": []})
    untrained.stage("iter_1/eval", lambda d: {"cpl": {}, "cpl_epochs": []})
    assert _iteration_cpl_run(untrained, "cpl", 5) is None


def test_an_ordering_without_pairs_is_reported_untrained_not_a_failed_loop(tmp_path):
    """Iteration 1's trees may hold no pair an ordering uses (the quick demo once had Q pairs only): the
    ablation records why and trains nothing, and the table shows the row without epochs."""
    from tests.test_train_pairs import write_tree

    cfg = default_config()
    cfg.loop.ablation_orderings = ("shuffle", "complete_only")
    cfg.loop.ablation_seeds = 2
    cfg.policy_train.tau = 100.0  # no two completions differ by that much: no stepwise or complete pair
    run = LoopRun(cfg=cfg, root=as_path(tmp_path), log=lambda s: None)
    (tmp_path / "iter_1" / "search" / "trees").mkdir(parents=True)
    write_tree(tmp_path / "iter_1" / "search" / "trees" / "p0.jsonl")
    never_loaded = tmp_path / "never_loaded"  # the run's identity reads its files; no pair loads it
    never_loaded.mkdir()
    (never_loaded / "model.safetensors").write_bytes(b"not a checkpoint")
    run.stage("iter_1/sft", lambda d: {"policy": str(never_loaded)})
    table = _ablations(run)
    assert table["shuffle"]["epochs"] == [] and table["shuffle"]["train_pairs"] == 0
    assert table["shuffle"]["untrained"] == "no pairs for ordering 'shuffle' passed the thresholds"
    assert table["complete_only"]["seeds"] == [0, 1]
    md = markdown({"config": {"task": "arith", "iterations": 1, "seed": 0}, "base": {}, "critics": {},
                   "iterations": [], "ablations": table, "wall_seconds": 1.0})
    assert "| shuffle | 0 | - | untrained: no pairs for ordering 'shuffle' passed the thresholds | - |" in md


def test_a_seed_with_nothing_to_train_on_leaves_the_other_seeds_means(tmp_path):
    cfg = default_config()
    cfg.loop.ablation_orderings, cfg.loop.ablation_seeds = ("shuffle",), 2
    run = LoopRun(cfg=cfg, root=as_path(tmp_path), log=lambda s: None)
    run.stage("iter_1/sft", lambda d: {"policy": "p"})
    run.stage("ablations/shuffle_seed0", lambda d: {"ordering": "shuffle", "seed": 0, "epoch_accuracy": [0.3, 0.4],
                                                    "train_pairs": 5})
    run.stage("ablations/shuffle_seed1", lambda d: {"ordering": "shuffle", "seed": 1, "epoch_accuracy": [],
                                                    "train_pairs": 0, "untrained": "no pairs"})
    row = _ablations(run)["shuffle"]
    assert [(e["epoch"], e["mean"], e["spread"]) for e in row["epochs"]] == [(1, 0.3, 0.0), (2, 0.4, 0.0)]
    assert row["trained_seeds"] == [0] and row["untrained"] == "no pairs"


def _acc(a, tokens=100.0):
    return {"accuracy": a, "n": 50, "ci95": [max(0.0, a - 0.1), min(1.0, a + 0.1)], "mean_generated_tokens": tokens}


def test_report_files_and_tables(tmp_path):
    report = {
        "config": {"task": "arith", "iterations": 2, "seed": 0},
        "base": {"greedy": _acc(0.3, 60), "maj@16": _acc(0.4, 900), "orm@16": _acc(0.55, 900), "mcts": _acc(0.5, 700)},
        "critics": {"value": {"auroc": 0.85, "ece": 0.04}, "orm": {"auroc": 0.93, "ece": 0.03}},
        "iterations": [
            {"iteration": i, "synthesized_prompts": 100, "sft_traces": 90, "sft": {"greedy": _acc(0.3 + 0.1 * i)},
             "cpl": {"greedy": _acc(0.32 + 0.1 * i), "mcts@8": _acc(0.6)},
             "pairs": {"stepwise": 7, "complete": 17}, "train_pairs": 24,
             "synthesis": {"counts": {"generated": 330, "kept": 100, "dropped": {"ungrounded": 223, "too_long": 0,
                                                                                "near_duplicate_d0": 7}}}}
            for i in (1, 2)],
        "ablations": {"cpl": {"train_pairs": 40, "epochs": [{"epoch": 1, "mean": 0.5, "spread": 0.02}]}},
        "search_ablation": {"problems": 50, "rungs": [
            {"rung": "prm", "label": "+ PRM", "paper_gsm8k": 85.9, **_acc(0.42, 300), "mean_nodes": 12.5,
             "configured": True}]},
        "wall_seconds": 12.0,
    }
    write_report(report, as_path(tmp_path))
    write_report(report, as_path(tmp_path))  # a rerun of a finished loop rewrites the report and plots
    for name in ("report.json", "report.md", "accuracy_per_iteration.png", "accuracy_vs_tokens.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = markdown(report)
    assert ("| 2 | 100 | 90 | stepwise 7, complete 17; 24 | 50.0% [40.0, 60.0] | 52.0% [42.0, 62.0] | "
            "60.0% [50.0, 70.0] |") in md
    # Imagination's counts per filter (the issue: kept and dropped prompts per filter in the report).
    assert "| 1 | 330 | 100 | ungrounded 223, near_duplicate_d0 7 |" in md
    # A round that kept the policy it started from says so where its scores stand.
    report["iterations"][1]["untrained"] = {"sft": None, "cpl": "no pairs passed the thresholds"}
    assert ("| 2 | 100 | 90 | stepwise 7, complete 17; 24 | 50.0% [40.0, 60.0] | 52.0% [42.0, 62.0] "
            "(untrained: no pairs passed the thresholds) | "
            "60.0% [50.0, 70.0] (untrained: no pairs passed the thresholds) |") in markdown(report)
    assert "| value | 0.850 | 0.040 |" in md and "| cpl | 40 | 1 | 50.0% | 2.0 |" in md
    assert "| + PRM (the configured search) | 42.0% [32.0, 52.0] | 300 | 12.5 | 85.9% |" in md
    assert find_method(report["iterations"][0]["cpl"], "mcts")["accuracy"] == 0.6
    assert find_method(report["base"], "beam") is None


def test_search_ablation_rungs_add_one_component_at_a_time():
    from alphallm_jax.pipeline.search_ablation import RUNGS, rung_overrides
    from alphallm_jax.search.mcts_config import MCTSConfig

    full = MCTSConfig(alpha=1.0, beta_prm=1.0, beta_orm=1.0, num_rollouts=4, merge_distance="edit")
    rungs = rung_overrides(full)
    assert [r.name for r, _ in rungs] == [r.name for r in RUNGS]
    configs = [full.replace(**changes) for _, changes in rungs]
    assert [(c.alpha, c.beta_prm, c.beta_orm, c.num_rollouts, c.merge_distance) for c in configs] == [
        (0.0, 0.0, 0.0, 0, "none"), (1.0, 0.0, 0.0, 0, "none"), (1.0, 1.0, 0.0, 0, "none"),
        (1.0, 1.0, 1.0, 4, "none"), (1.0, 1.0, 1.0, 4, "edit")]
    assert rungs[-1][1] == {} and configs[0].rollouts_per_node == 0
    # A search configured without merging is the fourth rung; the fifth still measures merging.
    no_merge = rung_overrides(full.replace(merge_distance="none", merge_threshold=10.0))
    assert no_merge[3][1] == {} and no_merge[4][1] == {"merge_distance": "edit"}
    assert full.replace(merge_distance="none").replace(**no_merge[4][1]).merging


def test_the_loop_refuses_a_pair_margin_beyond_its_searchs_q_scale_before_any_stage(tmp_path):
    from alphallm_jax.pipeline.loop import run_loop

    cfg = default_config()  # the gsm8k_small preset's three critics: Q in [0, 3]
    cfg.search.mcts.beta_prm = 0.0  # a preset field overridden in the config: Q in [0, 2]
    cfg.policy_train.tau = 2.0
    with pytest.raises(ValueError, match=r"tau=2: .*Q lies in \[0, 2\] with search.mcts beta_v=1, beta_prm=0"):
        run_loop(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run records its config


def test_the_loop_refuses_training_batches_that_do_not_split_over_its_mesh_before_any_stage(tmp_path):
    """A mesh of 8 (data x fsdp) devices: a DPO batch of 12 pairs in one microbatch would be refused by
    the trainer only when the first DPO stage starts, after the base, critics and search."""
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.pipeline.loop import check_train_batches, run_loop, trained_sections

    cfg = default_config()
    cfg.mesh.data, cfg.mesh.fsdp = 4, 2
    cfg.policy_train.dpo.batch_size = 12
    cfg.critics.train.update(batch_size=16, grad_accum_steps=4)  # microbatches of 4
    assert trained_sections(cfg)[0] == "base.train" and "policy_train.dpo" in trained_sections(cfg)
    with pytest.raises(ValueError) as refused:
        run_loop(cfg, tmp_path / "run")
    lines = str(refused.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["critics.train", "policy_train.dpo"]
    assert "grad_accum_steps one of [1, 2]" in lines[0] and "multiple of 8" in lines[1]
    assert not (tmp_path / "run" / "config.json").exists()
    cfg.policy_train.dpo.batch_size = 16
    cfg.critics.train.grad_accum_steps = 2
    cfg.model.checkpoint = str(tmp_path / "policy")  # a loaded policy: base.train is not trained
    assert "base.train" not in trained_sections(cfg)
    check_train_batches(cfg, mesh_from_config(cfg))  # every section splits now
    # A resumed run may change its mesh: the stages that finished train nothing more.
    cfg.critics.train.grad_accum_steps = 4
    check_train_batches(cfg, mesh_from_config(cfg), finished=lambda stage: stage == "critics_stage")
    cfg.loop.iterations = 0
    assert trained_sections(cfg, lambda stage: stage == "critics_stage") == []


def test_work_is_split_by_process_or_shared_on_a_mesh_spanning_processes(monkeypatch):
    """Simulated: 8 devices, 2 processes of 4. Each process on its own devices takes a fixed share of the
    problems and writes it; on a mesh over every process's devices all take every problem (each device
    call together), only process 0 writes, and counters of that shared work are not summed; a mesh over
    some processes only is refused before any work."""
    import dataclasses

    import jax
    import numpy as np

    from alphallm_jax.sampling import sampler_from_config
    from alphallm_jax.utils import distributed as dist

    @dataclasses.dataclass(frozen=True)
    class FakeDevice:
        id: int
        process_index: int

    devices = [FakeDevice(i, i // 4) for i in range(8)]

    def fake_mesh(devs):
        return types.SimpleNamespace(devices=np.asarray(devs, object).reshape(2, -1, 2),
                                     shape={"data": 2, "fsdp": len(devs) // 4, "tensor": 2})

    spanning, local = fake_mesh(devices), fake_mesh(devices[:4])
    assert not dist.spans_processes(spanning)  # one process: every device is its own
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: devices[:4])
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        for mesh in (None, local):
            assert not dist.spans_processes(mesh)
            dist.check_sampling_mesh(mesh)
            assert dist.this_process_share(list(range(5)), mesh) == ([0, 2, 4], [1, 3])[index]
            assert dist.writes_results(mesh)
        assert dist.spans_processes(spanning)
        dist.check_sampling_mesh(spanning)
        assert dist.this_process_share(list(range(5)), spanning) == [0, 1, 2, 3, 4]
        assert dist.writes_results(spanning) == (index == 0)
        assert dist.sum_over_processes({"n": 3}, spanning) == {"n": 3}  # no collective: the same work
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"mesh data=2 fsdp=2 tensor=2 spans the devices of processes \[0, 1\] of 3"):
        sampler_from_config(default_config(), None, None, max_len=16, mesh=spanning)
