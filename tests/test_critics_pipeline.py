"""`alphallm train-critics` end to end on a tiny random policy: every artifact, resume, the fast policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alphallm_jax import cli


def test_train_critics_is_a_registered_subcommand():
    assert cli.COMMANDS["train-critics"][0] == "train_critics"


@pytest.mark.slow
def test_train_critics_end_to_end(tmp_path, monkeypatch):
    from alphallm_jax.config import default_config
    from alphallm_jax.critics.pipeline import run_train_critics
    from alphallm_jax.data.arith import ArithConfig, generate_problems
    from alphallm_jax.data.prompts import format_prompt, format_solution
    from alphallm_jax.data.spm_training import SPECIAL_IDS, train_sentencepiece
    from alphallm_jax.models import ModelConfig, Tokenizer, create_model
    from alphallm_jax.models.hf_io import save_hf_checkpoint

    problems = generate_problems(ArithConfig(), 60, seed=0, split="train")
    spm = tmp_path / "tokenizer.model"
    train_sentencepiece([format_prompt(p, "plain") + format_solution(p.solution, p.task, p.answer) for p in problems],
                        spm, vocab_size=384)
    tokenizer = Tokenizer.from_sentencepiece(spm)
    model_cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                            bos_token_id=SPECIAL_IDS["bos_id"], eos_token_ids=(SPECIAL_IDS["eos_id"],),
                            pad_token_id=SPECIAL_IDS["pad_id"])
    save_hf_checkpoint(create_model(model_cfg, seed=0), model_cfg, tmp_path / "policy", tokenizer=tokenizer)

    cfg = default_config()
    cfg.critics.policy = str(tmp_path / "policy")
    cfg.critics.num_train_prompts, cfg.critics.num_dev_prompts = 4, 3
    cfg.critics.data.update(dict(num_solutions=2, num_rollouts=2, max_new_tokens=16, max_step_tokens=8, max_steps=3,
                                 prompts_per_chunk=2, pool_slots=64))
    cfg.critics.train.update(dict(batch_size=4, epochs=1, checkpoint_every=-1, max_seq_len=256))
    cfg.critics.eval_methods = ("greedy", "maj@2", "orm@2", "prm@2", "mcts@2")
    cfg.critics.eval_limit = 3
    cfg.search.mcts.update(dict(max_depth=2, c_min0=2, num_rollouts=1))
    cfg.search.options.update(dict(max_option_tokens=8, max_solution_tokens=16))
    cfg.eval.max_new_tokens = 16
    cfg.sampling.max_batch = 32
    cfg.rollout_policy.enabled = True
    cfg.rollout_policy.model.update(dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                         num_kv_heads=1, head_dim=8))
    cfg.rollout_policy.train.update(dict(batch_size=8, epochs=1, checkpoint_every=-1))
    cfg.base.num_train, cfg.base.num_dev = 16, 8
    cfg.critics.model.init = "rollout_policy"  # the critic's backbone: the fast policy, trained first

    # The critics stage's mcts searches with the config's settings and the fast-rollout policy, as
    # `alphallm eval` does (not the built-in defaults). What the search is handed is recorded, and the
    # search itself skipped (unsearched trees, every answer empty): `test_search_lm_backend.py` runs it.
    from alphallm_jax.search import mcts as mcts_lib
    from alphallm_jax.search.tree import Tree
    searched = []

    def recording_run_mcts(problems, backend, config, *args, **kwargs):
        searched.append((config, backend))
        return [Tree(problem=p, config=config) for p in problems]

    monkeypatch.setattr(mcts_lib, "run_mcts", recording_run_mcts)
    out = run_train_critics(cfg, tmp_path / "run")
    assert len(searched) == 1
    config, backend = searched[0]
    assert (config.max_depth, config.c_min0, config.num_rollouts, config.num_simulations) == (2, 2, 1, 2)
    assert backend.rollout_sampler is not backend.sampler and backend.options.max_option_tokens == 8
    root = tmp_path / "run" / "critics"
    for path in ("data/train/DONE", "data/dev/DONE", "critic/DONE", "critic/critic_config.json", "calibration.json",
                 "calibration.md", "timings.json", "eval/summary.json", "critic_train.json"):
        assert (root / path).exists(), path
    assert (tmp_path / "run" / "fast_rollout" / "policy" / "DONE").exists()
    critic_config = json.loads((root / "critic" / "critic_config.json").read_text())
    assert '"hidden_size": 16' in json.dumps(critic_config) and out["train"]["backbone"] == "rollout_policy"
    report = json.loads((root / "calibration.json").read_text())
    for name in ("value", "value_tool", "prm", "prm_tool", "orm", "orm_tool"):
        assert report[name]["n"] > 0 and 0.0 <= report[name]["ece"] <= 1.0
        # A 95% interval from resampling the dev prompts wherever the AUROC is defined (it may not be: a
        # random policy's resamples can miss a class).
        ci = report[name]["auroc_ci"]
        assert ci == [None, None] or (report[name]["auroc"] is not None and 0.0 <= ci[0] <= ci[1] <= 1.0)
    # The held-out MC reference covers the states that have rollout rows of their own (a random policy's
    # steps often run to the token cap, which ends a trajectory, so there may be none).
    vref = report["value_reference"]
    dev_rows = [json.loads(line) for line in (root / "data/dev/rows.jsonl").read_text().splitlines()]
    assert (vref["states"] > 0) == any(r["kind"] == "rollout" for r in dev_rows)
    assert vref["heldout_mc"]["n"] == vref["value"]["n"] == vref["tools_only"]["n"] == vref["states"]
    assert ("How much the states decide" in (root / "calibration.md").read_text()) == (vref["states"] > 0)
    for name in ("orm", "orm_tool", "tools_only", "prm_solution"):
        within = report[name]["within_prompt_auroc"]
        assert report[name]["within_prompt_pairs"] >= 0 and (within is None or 0.0 <= within <= 1.0)
    assert "Within a prompt" in (root / "calibration.md").read_text()
    # The outcome combiner, fitted on the train trajectories when they hold both outcomes (a random policy's
    # may not): then calibration.json and calibration.md report it and orm@k reranks by it.
    train_rows = [json.loads(line) for line in (root / "data/train/rows.jsonl").read_text().splitlines()]
    outcomes = {r["correct"] for r in train_rows if r["kind"] == "trajectory"}
    assert (root / "critic" / "combiner.json").exists() == (outcomes == {True, False})
    if outcomes == {True, False}:
        assert report["orm_combined"]["n"] == report["orm"]["n"]
        assert "| orm_combined |" in (root / "calibration.md").read_text()
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"greedy", "maj@2", "orm@2", "prm@2", "mcts@2"}
    assert set(out["timings"]) >= {"data", "train", "calibration", "eval", "fast_rollout_policy"}

    again = run_train_critics(cfg, tmp_path / "run")  # everything is resumed from the artifacts
    assert again["timings"]["data"] < out["timings"]["data"] and again["train"] == out["train"]

    # A random policy is almost never right, so the combiner's fitted branch is reached by relabelling the
    # trajectories (a label is a plain field of the row): both outcomes, then a rerun fits and reports it.
    for split in ("train", "dev"):
        path = root / "data" / split / "rows.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(r for r in rows if r["kind"] == "trajectory"):
            row["correct"] = bool(i % 2)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "critic" / "combiner.json").unlink(missing_ok=True)
    third = run_train_critics(cfg, tmp_path / "run")
    combiner = json.loads((root / "critic" / "combiner.json").read_text())
    assert len(combiner["weights"]) == 3 and all(np.isfinite(combiner["weights"]))
    report = json.loads((root / "calibration.json").read_text())
    assert report["orm_combined"]["n"] == report["orm"]["n"] > 0
    assert 0.0 <= report["orm_combined"]["ece"] <= 1.0 and "| orm_combined |" in (root / "calibration.md").read_text()
    assert third["train"] == out["train"] and "combiner" in third["timings"]


def test_rollout_policy_backbone_needs_the_fast_policy(tmp_path):
    from alphallm_jax.config import default_config
    from alphallm_jax.critics.pipeline import make_critic

    cfg = default_config()
    cfg.critics.model.init = "rollout_policy"
    with pytest.raises(FileNotFoundError, match="rollout_policy.enabled"):
        make_critic(cfg, None, None, workdir=tmp_path)


def test_a_critic_with_fewer_positions_than_its_data_is_refused_before_training(tmp_path):
    """Calibration scores the dev rows whole: a scratch critic of 32 positions for 40-token rows would fail
    there, after its training; it is refused first, naming the keys."""
    from alphallm_jax.config import default_config
    from alphallm_jax.critics.pipeline import train_critic
    from alphallm_jax.models import create_model
    from tests.tiny_lm import arith_tokenizer, model_config

    tokenizer = arith_tokenizer(tmp_path)
    policy = create_model(model_config(tokenizer), seed=0)
    cfg = default_config()
    cfg.critics.model.update(dict(init="scratch", hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=8, max_position_embeddings=32))
    rows = [{"kind": "trajectory", "prompt_ids": [1] * 10, "step_ids": [[5] * 12, [6] * 18]}]
    with pytest.raises(ValueError, match=r"longest row holds 40 tokens .* more than the 32 positions .*"
                                         r"raise critics.model.max_position_embeddings"):
        train_critic(cfg, tmp_path / "run", rows, rows, policy, tokenizer)
    assert not (tmp_path / "run" / "critics" / "train").exists()  # nothing trained


def test_train_critics_reuses_its_results_only_for_the_same_policy_and_settings(tmp_path):
    # `alphallm train-critics` has no run config to guard it (the loop's config.json): the critics folder
    # records the policy's files and the settings its data, critic and combiner depend on.
    from alphallm_jax.config import default_config
    from alphallm_jax.critics.pipeline import critics_identity
    from alphallm_jax.utils.run_identity import check_run_identity

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    cfg = default_config()
    root = tmp_path / "critics"
    check_run_identity(root, critics_identity(cfg, policy))
    (root / "critic").mkdir()
    (root / "critic" / "DONE").write_text("ok")
    # Reporting, a cache size and train bookkeeping: the same critic.
    cfg.critics.eval_limit, cfg.critics.data.pool_slots, cfg.critics.train.progress_bar = 7, 99, False
    cfg.critics.calibration.bootstrap = 10
    check_run_identity(root, critics_identity(cfg, policy))
    cfg.critics.loss.orm_weight = 2.0
    with pytest.raises(ValueError, match="differs in critics.loss.orm_weight"):
        check_run_identity(root, critics_identity(cfg, policy))
    cfg.critics.loss.orm_weight = 1.0
    (policy / "model.safetensors").write_bytes(b"retrained")
    with pytest.raises(ValueError, match="differs in policy"):
        check_run_identity(root, critics_identity(cfg, policy))
