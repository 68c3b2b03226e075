"""`alphallm sweep`: the grid of methods x budgets x checkpoints, checkpoints from a loop run, the merged
table and plot, and resuming."""

from __future__ import annotations

import json

import pytest

from alphallm_jax.pipeline.sweep import loop_checkpoints, method_specs, run_sweep, sweep_checkpoints
from tests.helpers import load_config


def test_method_specs_expand_budgets_in_order():
    assert method_specs(["greedy", "maj", "orm@8", "mcts"], [4, 16]) == [
        "greedy", "maj@4", "maj@16", "orm@8", "mcts@4", "mcts@16"]
    # --config.sweep.methods=greedy,maj arrives as one string
    assert method_specs(["greedy,maj"], [2]) == ["greedy", "maj@2"]
    assert method_specs(["greedy", "greedy", "maj@4", "maj"], [4]) == ["greedy", "maj@4"]
    with pytest.raises(ValueError, match="unknown evaluation method 'majority'"):
        method_specs(["majority"], [4])
    with pytest.raises(ValueError, match="sweep.budgets is empty"):
        method_specs(["orm"], [])
    with pytest.raises(ValueError, match="sweep.methods is empty"):
        method_specs([], [4])


def _stage(path, policy):
    path.mkdir(parents=True, exist_ok=True)
    (path / "stage.json").write_text(json.dumps({"record": {"policy": str(policy)}, "wall_seconds": 1.0}))


def test_loop_checkpoints_follow_the_stage_records(tmp_path):
    loop = tmp_path / "loop"
    for stage in ("base", "iter_1/sft", "iter_1/cpl"):
        (loop / stage / "policy").mkdir(parents=True)
        _stage(loop / stage, loop / stage / "policy")
    # Iteration 2 kept its input policy (no trace passed the threshold) and has no CPL stage yet.
    _stage(loop / "iter_2" / "sft", loop / "iter_1" / "cpl" / "policy")
    found = loop_checkpoints(loop)
    assert [(c.name, c.path) for c in found] == [
        ("base", str(loop / "base" / "policy")), ("iter_1/sft", str(loop / "iter_1" / "sft" / "policy")),
        ("iter_1/cpl", str(loop / "iter_1" / "cpl" / "policy")),
        ("iter_2/sft", str(loop / "iter_1" / "cpl" / "policy"))]
    cfg = load_config("demo_arith", "quick")
    cfg.sweep.loop_workdir = str(loop)
    cfg.sweep.checkpoints = (f"extra={loop / 'base' / 'policy'}",)
    # The same directory twice is evaluated once, under its first name.
    assert [c.name for c in sweep_checkpoints(cfg)] == ["extra", "iter_1/sft", "iter_1/cpl"]
    cfg.sweep.checkpoints = (str(tmp_path / "missing"),)
    with pytest.raises(FileNotFoundError, match="sweep checkpoint 'missing'"):
        sweep_checkpoints(cfg)
    with pytest.raises(FileNotFoundError, match="no finished loop stage"):
        loop_checkpoints(tmp_path / "empty")
    # A loop started from a checkpoint (a real model) has no base stage: its base is the run config's.
    import json

    real = tmp_path / "real"
    (real / "iter_1" / "sft" / "policy").mkdir(parents=True)
    _stage(real / "iter_1" / "sft", real / "iter_1" / "sft" / "policy")
    (real / "config.json").write_text(json.dumps({"model": {"checkpoint": "/ckpt/llama2_7b"}}))
    assert [(c.name, c.path) for c in loop_checkpoints(real)][0] == ("base", "/ckpt/llama2_7b")


@pytest.mark.slow
def test_sweep_evaluates_every_cell_and_resumes(tmp_path):
    from flax import nnx

    from alphallm_jax.models.decoder import Decoder
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from alphallm_jax.pipeline.loop import evaluate_policy
    from tests.tiny_lm import arith_tokenizer, model_config

    tok = arith_tokenizer(tmp_path)
    mcfg = model_config(tok)
    for seed in (0, 1):
        save_hf_checkpoint(Decoder(mcfg, rngs=nnx.Rngs(seed)), mcfg, tmp_path / f"p{seed}", tokenizer=tok)
    cfg = load_config("demo_arith", "quick")
    cfg.eval.limit, cfg.eval.max_new_tokens, cfg.eval.batch_size = 6, 8, 3
    cfg.sweep.checkpoints = (f"a={tmp_path / 'p0'}", f"b={tmp_path / 'p1'}")
    cfg.sweep.methods, cfg.sweep.budgets = ("greedy", "maj", "pass"), (2,)
    table = run_sweep(cfg, tmp_path / "sweep")
    assert table["methods"] == ["greedy", "maj@2", "pass@2"]
    assert [(r["checkpoint"], r["method"]) for r in table["rows"]] == [
        (c, m) for c in ("a", "b") for m in ("greedy", "maj@2", "pass@2")]
    assert all(r["n"] == 6 for r in table["rows"])
    on_disk = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(table["rows"]))
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| a |" in md and "| b |" in md and "maj@2" in md
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # Each cell is the harness's evaluation of that checkpoint: the same as evaluating it directly.
    direct = evaluate_policy(cfg, tmp_path, str(tmp_path / "p1"), ["greedy", "maj@2"], tmp_path / "direct")
    for spec in ("greedy", "maj@2"):
        row = next(r for r in table["rows"] if r["checkpoint"] == "b" and r["method"] == spec)
        assert row["accuracy"] == direct[spec]["accuracy"]
        assert row["mean_generated_tokens"] == direct[spec]["mean_generated_tokens"]
        a = (tmp_path / "sweep" / "b" / "eval" / spec.replace("@", "_") / "predictions.jsonl").read_text()
        assert a == (tmp_path / "direct" / "eval" / spec.replace("@", "_") / "predictions.jsonl").read_text()
    # A rerun resumes: nothing is sampled again, the table is the same.
    part = next((tmp_path / "sweep" / "a" / "eval" / "greedy").glob("predictions.part*.jsonl"))
    before = part.read_text()
    again = run_sweep(cfg, tmp_path / "sweep")
    assert again["rows"] == table["rows"] and part.read_text() == before
