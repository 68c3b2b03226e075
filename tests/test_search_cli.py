"""`alphallm search`: search settings from the config, problem inputs, trees written and resumed, summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alphallm_jax.config import default_config
from alphallm_jax.data.prompts import format_prompt
from alphallm_jax.models.critic import save_critic
from alphallm_jax.models.hf_io import save_hf_checkpoint
from alphallm_jax.pipeline.search_run import (
    SearchSettings,
    load_search_problems,
    mcts_config_from,
    read_prompts_file,
    search_to_dir,
    tree_filename,
)
from alphallm_jax.search import MCTSConfig, SearchProblem, Tree
from alphallm_jax.search.synthetic import SyntheticBackend
from alphallm_jax.utils.io import DataFormatError
from tests.helpers import REPO_ROOT
from tests.tiny_lm import arith_tokenizer, random_critic, steered_policy


def test_search_settings_come_from_the_config_with_the_preset_as_base():
    cfg = default_config()
    assert SearchSettings.from_config(cfg).mcts == MCTSConfig.gsm8k_small()
    cfg.search.mcts.preset = "gsm8k_large"
    cfg.search.mcts.num_simulations = 12
    mcts = mcts_config_from(cfg.search.mcts)
    assert mcts == MCTSConfig.gsm8k_large().replace(num_simulations=12)
    cfg.search.options.max_option_tokens = 9
    cfg.search.beam.beam_width = 3
    settings = SearchSettings.from_config(cfg)
    assert settings.options.max_option_tokens == 9 and settings.beam.beam_width == 3
    cfg.search.mcts.preset = ""
    assert mcts_config_from(cfg.search.mcts) == MCTSConfig(num_simulations=12)


def test_problems_from_a_split_or_a_prompts_file(tmp_path):
    cfg = default_config()
    cfg.search.split, cfg.search.limit = "arith:test", 3
    problems = load_search_problems(cfg, lambda p: format_prompt(p, "plain"))
    assert len(problems) == 3 and all(p.reference and p.prompt.startswith("Question: ") for p in problems)
    assert len({p.seed for p in problems}) == 3
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "What is 2+3?", "answer": "5"}\n{"id": "x/1", "prompt": "Verbatim:\\n"}\n')
    rows = read_prompts_file(path, "arith", lambda p: format_prompt(p, "plain"), seed=0)
    assert [r.problem_id for r in rows] == ["prompt-00001", "x/1"]
    assert rows[0].reference == "5" and rows[0].prompt == "Question: What is 2+3?\nAnswer:\n"
    assert rows[1].reference is None and rows[1].prompt == "Verbatim:\n"
    assert tree_filename("x/1") == "x_1.jsonl"
    path.write_text('{"text": "no question"}\n')
    with pytest.raises(DataFormatError):
        read_prompts_file(path, "arith", lambda p: "", seed=0)


def test_a_resumed_search_redoes_started_chunks_whole_and_rewrites_nothing(tmp_path):
    """Trees are searched in fixed chunks of `problems_per_call` (lockstep batches, whose floats depend
    on their shapes): a rerun skips finished chunks, searches a started one again with all its problems,
    and writes only the trees it lacks."""
    problems = [SearchProblem(f"p{i}", f"Q{i}\n", seed=i) for i in range(5)]
    settings = SearchSettings(mcts=MCTSConfig(c_min0=2, c_max0=2, num_simulations=6, min_terminals=1, max_depth=3))
    trees_dir = tmp_path / "trees"
    trees, searched = search_to_dir(problems, SyntheticBackend(), settings, trees_dir, problems_per_call=2)
    assert searched == 5 and [t.problem.problem_id for t in trees] == [p.problem_id for p in problems]
    before = {p.name: p.read_bytes() for p in trees_dir.iterdir()}
    (trees_dir / "p1.jsonl").unlink()  # chunks [p0 p1] [p2 p3] [p4]: only the first is started
    mtimes = {p.name: p.stat().st_mtime_ns for p in trees_dir.iterdir()}
    backend = SyntheticBackend()
    _, searched = search_to_dir(problems, backend, settings, trees_dir, problems_per_call=2)
    assert searched == 2  # the whole started chunk is searched again (its count says so), one tree written
    assert {r.problem_id for call in backend.calls_of("start") for r in call} == {"p0", "p1"}
    assert {p.name: p.read_bytes() for p in trees_dir.iterdir()} == before
    assert all(trees_dir.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items())


def test_a_finished_tree_of_another_problem_under_the_same_id_is_refused(tmp_path):
    # A prompts file's ids are its line numbers: another file reuses them for other prompts.
    settings = SearchSettings(mcts=MCTSConfig(c_min0=2, c_max0=2, num_simulations=4, min_terminals=1, max_depth=2))
    search_to_dir([SearchProblem("prompt-00001", "Q1\n", reference="5")], SyntheticBackend(), settings,
                  tmp_path / "trees")
    with pytest.raises(ValueError, match="holds the tree of another problem under the id 'prompt-00001'"):
        search_to_dir([SearchProblem("prompt-00001", "Q2\n", reference="7")], SyntheticBackend(), settings,
                      tmp_path / "trees")


def test_the_fast_rollout_policy_is_loaded_only_for_searches_that_roll_out(tmp_path):
    """`mcts_lean` and `beam` sample no fast rollouts: their backend neither needs nor loads the
    fast-rollout policy (here absent from the workdir), while `mcts`'s looks for it."""
    from alphallm_jax.pipeline.search_methods import eval_components

    tokenizer = arith_tokenizer(tmp_path)
    cfg = default_config()
    cfg.task, cfg.rollout_policy.enabled = "arith", True
    cfg.critics.checkpoint = str(tmp_path / "critic")
    save_critic(random_critic(tokenizer), tmp_path / "critic", tokenizer=tokenizer)
    policy = steered_policy(tokenizer)
    lean = eval_components(cfg, tmp_path / "run", ["greedy", "mcts_lean@4", "beam@2"], policy, tokenizer, ["Q\n"])
    assert lean["search_backend"].rollout_sampler is lean["search_backend"].sampler  # nothing else loaded
    with pytest.raises(FileNotFoundError):
        eval_components(cfg, tmp_path / "run", ["mcts"], policy, tokenizer, ["Q\n"])


@pytest.mark.slow
def test_search_cli_writes_trees_resumes_and_summarises(tmp_path):
    tokenizer = arith_tokenizer(tmp_path)
    policy = steered_policy(tokenizer)  # saved without its logit bias: a plain random decoder
    save_hf_checkpoint(policy, policy.cfg, tmp_path / "policy", tokenizer=tokenizer)
    save_critic(random_critic(tokenizer), tmp_path / "critic", tokenizer=tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "question": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"}\n'
                       '{"id": "b", "question": "Ann has 9 pens and gives away 2. How many are left?"}\n')
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "alphallm_jax.cli", "search", "--config=configs/demo_arith.py",
            f"--workdir={workdir}", f"--config.model.checkpoint={tmp_path / 'policy'}",
            f"--config.search.critics={tmp_path / 'critic'}", f"--config.search.prompts_file={prompts}",
            "--config.rollout_policy.enabled=False", "--config.search.mcts.num_simulations=4",
            "--config.search.mcts.min_terminals=1", "--config.search.mcts.c_min0=2", "--config.search.mcts.max_depth=3",
            "--config.search.mcts.num_rollouts=1", "--config.search.options.max_option_tokens=8",
            "--config.search.options.max_solution_tokens=24", "--config.search.pool_slots=256",
            "--config.search.max_batch=16"]
    first = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    trees_dir = workdir / "search" / "trees"
    files = sorted(p.name for p in trees_dir.iterdir())
    assert files == ["a.jsonl", "b.jsonl"]
    tree = Tree.load(trees_dir / "a.jsonl")
    assert tree.problem.reference == "7" and len(tree) > 1 and tree.chosen_path
    summary = json.loads((workdir / "search" / "summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["graded"] == 1 and summary["searched_now"] == 2
    assert summary["mean_nodes"] > 1 and summary["mean_generated_tokens"] > 0
    assert "search mcts: 2 problems" in first.stdout
    before = {name: (trees_dir / name).read_bytes() for name in files}
    again = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((workdir / "search" / "summary.json").read_text())["searched_now"] == 0
    assert {name: (trees_dir / name).read_bytes() for name in files} == before
    # A run killed after one tree searches its chunk (both problems) again and writes the missing tree:
    # the same to the byte.
    (trees_dir / "b.jsonl").unlink()
    resumed = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_summary = json.loads((workdir / "search" / "summary.json").read_text())
    assert resumed_summary["searched_now"] == 2  # its chunk, both problems, searched again
    assert resumed_summary["this_run"]["backend_stats"] and resumed_summary["num_problems"] == 2
    assert {name: (trees_dir / name).read_bytes() for name in files} == before
    # Another critic (or policy, or search setting) would skip the trees searched without it: refused.
    save_critic(random_critic(tokenizer, seed=1), tmp_path / "critic", tokenizer=tokenizer)
    other = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert other.returncode != 0 and "holds results of another run, which differs in critic" in other.stderr


def test_in_lockstep_every_process_skips_the_trees_process_0_read_and_only_it_writes(tmp_path, monkeypatch):
    """On a mesh spanning processes (simulated here in one process) each process searches every problem;
    which trees are finished is process 0's reading: a tree it could not read (torn) is searched again by
    all, one it read that another process lacks stops all (a workdir that is not shared), and a process
    other than 0 writes no tree."""
    from alphallm_jax.pipeline import search_run

    problems = [SearchProblem(f"p{i}", f"Q{i}\n", seed=i) for i in range(3)]
    settings = SearchSettings(mcts=MCTSConfig(c_min0=2, c_max0=2, num_simulations=6, min_terminals=1, max_depth=3))
    trees_dir = tmp_path / "trees"
    search_to_dir(problems, SyntheticBackend(), settings, trees_dir)
    (trees_dir / "p1.jsonl").write_text('{"torn": ')  # process 0 cannot read it
    monkeypatch.setattr(search_run, "spans_processes", lambda mesh: True)
    monkeypatch.setattr(search_run, "coordinator_flags", lambda flags, mesh=None: list(flags))  # this is process 0
    backend = SyntheticBackend()
    trees, searched = search_to_dir(problems, backend, settings, trees_dir, problems_per_call=1)
    assert searched == 1 and {r.problem_id for call in backend.calls_of("start") for r in call} == {"p1"}
    assert Tree.load(trees_dir / "p1.jsonl").problem.problem_id == "p1"  # rewritten by process 0

    monkeypatch.setattr(search_run, "sum_over_processes", lambda counts, mesh=None: {"missing": 1})
    with pytest.raises(RuntimeError, match="need one shared workdir"):
        search_to_dir(problems, SyntheticBackend(), settings, trees_dir)

    monkeypatch.setattr(search_run, "sum_over_processes", lambda counts, mesh=None: dict(counts))
    monkeypatch.setattr(search_run, "writes_results", lambda mesh: False)  # process 1
    (trees_dir / "p2.jsonl").unlink()
    trees, searched = search_to_dir(problems, SyntheticBackend(), settings, trees_dir, problems_per_call=1)
    assert searched == 1 and trees[2].problem.problem_id == "p2" and not (trees_dir / "p2.jsonl").exists()
