"""The evaluation harness: methods, grading, resumable artifacts, merging, summaries, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from alphallm_jax.config import default_config
from alphallm_jax.data.problems import Problem
from alphallm_jax.pipeline import reporting
from alphallm_jax.pipeline.eval_methods import EvalContext, make_method
from alphallm_jax.pipeline.evaluation import evaluate_methods, seed_results
from alphallm_jax.sampling import Completion
from tests.helpers import MISTRAL_TOKENIZER, REPO_ROOT, load_config, require_shared_data


class ScriptedSampler:
    """Returns fixed completions per prompt, in the Sampler.generate shape."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, *, num_samples, temperature, **kw):
        self.calls.append((list(prompts), num_samples, temperature))
        out = []
        for p in prompts:
            texts = self.answers[p][:num_samples]
            out.append([Completion(text=t, token_ids=list(range(len(t.split()))), logprobs=[-1.0] * len(t.split()),
                                   finish_reason="stop") for t in texts])
        return out


def _ctx(sampler, **eval_overrides):
    cfg = default_config()
    for k, v in eval_overrides.items():
        setattr(cfg.eval, k, v)
    return EvalContext(sampler=sampler, task="arith", prompt_for=lambda p: p.question, eval_cfg=cfg.eval)


PROBLEMS = [Problem(id=f"t-{i}", question=f"q{i}", answer=str(a), solution=None, task="arith", meta={})
            for i, a in enumerate([12, 7, 30])]


def test_majority_vote_picks_the_most_frequent_answer_and_counts_compute():
    sampler = ScriptedSampler({
        "q0": ["a\n#### 12\n\n", "b\n#### 11", "c\nd\n#### 12"],
        "q1": ["#### 5", "#### 6", "#### 5"],
        "q2": ["no answer here", "#### 30", "x"],
    })
    outs = make_method("maj@3").run(PROBLEMS, _ctx(sampler))
    assert [o.prediction for o in outs] == ["a\n#### 12", "#### 5", "#### 30"]  # stop string stripped
    assert outs[0].nodes == 2 + 2 + 3 and outs[0].generated_tokens == sum(len(t.split()) for t in sampler.answers["q0"])
    assert sampler.calls[0][1] == 3


def test_a_smaller_budget_reads_the_first_samples_of_a_larger_one():
    sampler = ScriptedSampler({"q0": ["#### 1", "#### 12", "#### 12"], "q1": ["#### 7", "#### 5", "#### 5"],
                               "q2": ["#### 30", "#### 2", "#### 2"]})
    ctx = _ctx(sampler)
    ctx.components["sample_cache"] = {}
    assert [o.prediction for o in make_method("maj@3").run(PROBLEMS, ctx)] == ["#### 12", "#### 5", "#### 2"]
    calls = len(sampler.calls)
    outs = make_method("maj@1").run(PROBLEMS, ctx)
    assert len(sampler.calls) == calls  # no new samples: the first one of each problem's three
    assert [o.prediction for o in outs] == ["#### 1", "#### 7", "#### 30"]
    make_method("maj@4").run(PROBLEMS, ctx)  # a larger budget samples
    assert sampler.calls[-1][1] == 4


def test_an_evaluation_draws_its_largest_sample_budget_once_whatever_the_order(tmp_path):
    """maj@2 before maj@3: one draw of 3 serves both, so a resumed run that has only maj@3 left (or
    another method order) reads the same samples and floats; greedy and tree searches draw nothing."""
    from alphallm_jax.pipeline.eval_methods import sample_budget

    assert sample_budget(["greedy", "maj@2", "orm@8,prm@4", "mcts@64", "pass@16"]) == 16
    assert sample_budget(["greedy", "mcts@64", "beam@8"]) == 0
    sampler = ScriptedSampler({q: ["#### 12", "#### 7", "#### 12"] for q in ("q0", "q1", "q2")})
    ctx = _ctx(sampler)
    ctx.components["sample_cache"] = {}
    summary = evaluate_methods(PROBLEMS, ctx, ["greedy", "maj@2", "maj@3"], tmp_path, batch_size=3)
    assert [c[1] for c in sampler.calls] == [1, 3]
    assert summary["maj@3"]["correct"] == 1 and summary["maj@2"]["n"] == 3


def test_method_specs_are_validated():
    with pytest.raises(ValueError, match="unknown evaluation method 'sample@4'"):
        make_method("sample@4")
    assert make_method("beam@4").spec == "beam@4" and make_method("mcts").spec == "mcts"
    with pytest.raises(ValueError, match="needs a budget"):
        make_method("maj")
    assert make_method("greedy").spec == "greedy"


def test_harness_writes_resumable_graded_artifacts(tmp_path):
    sampler = ScriptedSampler({"q0": ["3*4=<<3*4=12>>12\n#### 12"], "q1": ["#### 8"], "q2": ["#### 30\n\n"]})
    summary = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=2)
    assert summary["greedy"]["correct"] == 2 and summary["greedy"]["n"] == 3
    rows = [json.loads(line) for line in (tmp_path / "eval/greedy/predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t-0", "t-1", "t-2"]
    assert [r["correct"] for r in rows] == [True, False, True] and rows[1]["extracted"] == "8"
    assert (tmp_path / "eval/accuracy_vs_tokens.png").stat().st_size > 1000
    assert "| greedy | 66.7%" in (tmp_path / "eval/summary.md").read_text()
    # A rerun resumes: nothing is generated again. A torn last line (a kill mid-append) is redone.
    calls = len(sampler.calls)
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=2)
    assert len(sampler.calls) == calls
    part = next((tmp_path / "eval/greedy").glob("predictions.part*.jsonl"))
    text = part.read_text().splitlines()
    part.write_text("\n".join(text[:2]) + "\n" + text[2][:15])
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=2)
    assert sampler.calls[-1][0] == ["q2"]
    # Resumed with another process count (here: the part files of a two-process run): the finished
    # problems are read from them, not evaluated again.
    for f in (tmp_path / "eval/greedy").glob("predictions.part*.jsonl"):
        f.rename(f.with_name("predictions.part001-of-002.jsonl"))
    calls = len(sampler.calls)
    again = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=2)
    assert len(sampler.calls) == calls and again["greedy"]["correct"] == 2 and again["greedy"]["n"] == 3


def test_strict_match_counts_only_answers_marked_as_final(tmp_path):
    """A right last number without `####` is right under the flexible reading and wrong under strict-match
    (both in the summary); a row written before strict-match was recorded gets it when results merge."""
    sampler = ScriptedSampler({"q0": ["3*4=<<3*4=12>>12 pens in all."], "q1": ["#### 7"], "q2": ["So 30.\n#### 31"]})
    summary = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)["greedy"]
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["strict_accuracy"] == pytest.approx(1 / 3)
    rows = [json.loads(line) for line in (tmp_path / "eval/greedy/predictions.jsonl").read_text().splitlines()]
    assert [(r["correct"], r["correct_strict"]) for r in rows] == [(True, False), (True, True), (False, False)]
    assert "| greedy | 66.7% | " in (tmp_path / "eval/summary.md").read_text()
    assert "| 33.3% | 3 |" in (tmp_path / "eval/summary.md").read_text()
    part = next((tmp_path / "eval/greedy").glob("predictions.part*.jsonl"))
    old = [json.loads(line) for line in part.read_text().splitlines()]
    part.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "correct_strict"}) + "\n" for r in old))
    again = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)["greedy"]
    assert again["strict_accuracy"] == pytest.approx(1 / 3) and len(sampler.calls) == 1


def test_comma_separated_methods_are_separate_methods(tmp_path):
    """`--config.eval.methods=greedy,maj@2` arrives as one string: two methods, as in a sweep."""
    sampler = ScriptedSampler({q: ["#### 12", "#### 12"] for q in ("q0", "q1", "q2")})
    summary = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy, maj@2"], tmp_path, batch_size=3)
    assert list(summary) == ["greedy", "maj@2"]


def test_a_workdir_of_another_evaluation_is_refused_not_resumed(tmp_path):
    # The identity (run.json) holds what results depend on: the same one resumes, more methods or problems
    # too (eval.methods and eval.limit may change); another policy is refused before anything runs.
    sampler = ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"]})
    identity = {"policy": "aaa", "eval": {"temperature": 0.7, "methods": ["greedy"], "limit": 2}}
    # A first attempt that failed before any result left only its record: the next run takes the folder.
    from alphallm_jax.utils.run_identity import check_run_identity

    check_run_identity(tmp_path / "eval", {"policy": "zzz"})
    evaluate_methods(PROBLEMS[:2], _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity=identity)
    calls = len(sampler.calls)
    more = {**identity, "eval": {**identity["eval"], "methods": ["greedy", "maj@2"], "limit": 3}}
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity=more)
    # The batch q2 joins was started (q0, q1): it runs again whole, as an uninterrupted run batches it, and
    # only q2's row is written.
    assert sampler.calls[-1][0] == ["q0", "q1", "q2"] and len(sampler.calls) == calls + 1
    written = (tmp_path / "eval/greedy").glob("predictions.part*.jsonl")
    assert sorted(json.loads(x)["id"] for f in written for x in f.read_text().splitlines()) == ["t-0", "t-1", "t-2"]
    # The KV pool a preset sizes for its mesh may change with the mesh (a loop resumed on more hosts).
    identity["search"] = more["search"] = {"pool_slots": 8192, "max_batch": 128}
    (tmp_path / "eval" / "run.json").write_text(json.dumps(more))
    resized = {**more, "search": {"pool_slots": 1808, "max_batch": 128}}
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity=resized)
    assert len(sampler.calls) == calls + 1
    with pytest.raises(ValueError, match="differs in search.max_batch"):
        evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3,
                         identity={**more, "search": {"pool_slots": 8192, "max_batch": 64}})
    calls = len(sampler.calls)
    for changed, key in (({**identity, "policy": "bbb"}, "policy: 'aaa' -> 'bbb'"),
                         ({**identity, "eval": {**identity["eval"], "temperature": 1.0}}, "eval.temperature")):
        with pytest.raises(ValueError, match=f"holds results of another run, which differs in {key}"):
            evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity=changed)
    assert len(sampler.calls) == calls
    # A component the record lacks joins it (a critic method added later); once recorded, it must match.
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity={**more, "critic": "ccc"})
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["critic"] == "ccc"
    with pytest.raises(ValueError, match="differs in critic: 'ccc' -> 'ddd'"):
        evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3, identity={**more, "critic": "ddd"})
    # Except a required one: few-shot exemplars, recorded since they follow the run's seed, shaped the
    # prompts of a folder written before; its results cannot be vouched for.
    few = {**more, "prompt": {"prompt_format": "fewshot"}}
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path / "old", batch_size=3, identity=few)
    with pytest.raises(ValueError, match=r"predates a setting .* differs in prompt.exemplars: '<absent>' -> 'e1'"):
        evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path / "old", batch_size=3,
                         identity={**few, "prompt": {**few["prompt"], "exemplars": "e1"}})


def test_results_of_other_problems_under_the_same_ids_are_refused(tmp_path):
    # Ids name problems by split and index: after a change of generator (data.arith) or dataset, the
    # rows of `t-0` graded another question, and resuming would keep them.
    import dataclasses

    sampler = ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"], "q9": ["#### 3"]})
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)
    changed = [dataclasses.replace(PROBLEMS[0], question="q9", answer="3")] + PROBLEMS[1:]
    with pytest.raises(ValueError, match=r"problem 't-0' was evaluated on another question or reference"):
        evaluate_methods(changed, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)


def test_in_lockstep_process_0_decides_what_resumes_and_only_it_writes(tmp_path, monkeypatch):
    """On a mesh spanning processes (simulated in one process) every process evaluates every problem into
    one part file that process 0 alone writes; process 0's refusal of another problem's rows stops every
    process (here: process 1 hears it through the broadcast), rather than leaving the others waiting."""
    import dataclasses

    from alphallm_jax.pipeline import evaluation

    sampler = ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"], "q9": ["#### 3"]})
    monkeypatch.setattr(evaluation, "spans_processes", lambda mesh: True)
    monkeypatch.setattr(evaluation, "coordinator_flags", lambda flags, mesh=None: list(flags))
    monkeypatch.setattr(evaluation, "broadcast_int", lambda value: int(value))
    evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)
    assert [p.name for p in (tmp_path / "eval" / "greedy").glob("predictions.part*")] == [
        "predictions.part000-of-001.jsonl"]
    changed = [dataclasses.replace(PROBLEMS[0], question="q9", answer="3")] + PROBLEMS[1:]
    with pytest.raises(ValueError, match=r"problem 't-0' was evaluated on another question"):
        evaluate_methods(changed, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)
    monkeypatch.setattr(evaluation, "is_coordinator", lambda: False)
    monkeypatch.setattr(evaluation, "broadcast_int", lambda value: 1)  # process 0 refused
    with pytest.raises(ValueError, match=r"process 0 refused to resume these results"):
        evaluate_methods(changed, _ctx(sampler), ["greedy"], tmp_path, batch_size=3)


def test_eval_identity_holds_the_models_a_method_uses(tmp_path):
    from alphallm_jax.pipeline.evaluation import eval_identity
    from alphallm_jax.utils.io import files_fingerprint

    cfg = default_config()
    cfg.rollout_policy.enabled = True
    for name, text in (("policy", "p"), ("critics/critic", "c"), ("fast_rollout/policy", "f")):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model.safetensors").write_text(text)
    plain = eval_identity(cfg, tmp_path / "policy", ["greedy", "maj@4"], tmp_path)
    assert plain["policy"] == files_fingerprint(tmp_path / "policy") and "critic" not in plain
    reranked = eval_identity(cfg, tmp_path / "policy", ["orm@4"], tmp_path)
    assert reranked["critic"] == files_fingerprint(tmp_path / "critics/critic") and "rollout_policy" not in reranked
    searched = eval_identity(cfg, tmp_path / "policy", ["mcts"], tmp_path)
    assert searched["rollout_policy"] == files_fingerprint(tmp_path / "fast_rollout/policy")
    assert len({plain["policy"], reranked["critic"], searched["rollout_policy"]}) == 3
    assert "rollout_policy" not in eval_identity(cfg, tmp_path / "policy", ["mcts_lean@4", "beam"], tmp_path)
    # Rollouts by the policy itself are recorded too, so switching the fast policy off never resumes
    # past results it rolled out.
    cfg.rollout_policy.enabled = False
    assert eval_identity(cfg, tmp_path / "policy", ["mcts"], tmp_path)["rollout_policy"] == "the policy itself"
    cfg.rollout_policy.enabled = True
    assert "critic_settings" not in plain
    cfg.critics.tools.enabled = False  # the same critic files, other scores
    assert eval_identity(cfg, tmp_path / "policy", ["orm@4"], tmp_path)["critic_settings"] != reranked["critic_settings"]


def test_only_mcts_with_rollouts_and_the_fast_policy_enabled_rolls_out_with_it():
    from alphallm_jax.pipeline.search_run import SearchSettings, rolls_out_with_fast_policy

    cfg = default_config()
    cfg.rollout_policy.enabled = True
    assert SearchSettings.from_config(cfg).mcts.num_rollouts > 0
    assert rolls_out_with_fast_policy(cfg, ["greedy", "mcts@8"])
    assert not rolls_out_with_fast_policy(cfg, ["mcts_lean", "beam@4", "orm@16"])
    cfg.search.rollout_policy = False  # the policy rolls out itself
    assert not rolls_out_with_fast_policy(cfg, ["mcts"])
    cfg.search.rollout_policy, cfg.rollout_policy.enabled = True, False
    assert not rolls_out_with_fast_policy(cfg, ["mcts"])
    cfg.rollout_policy.enabled = True
    settings = SearchSettings.from_config(cfg)
    no_rollouts = dataclasses.replace(settings, mcts=settings.mcts.replace(num_rollouts=0, beta_orm=0.0))
    assert not rolls_out_with_fast_policy(cfg, ["mcts"], no_rollouts)


def test_seeded_results_are_reused_not_recomputed(tmp_path):
    """Rows of an earlier run of the same method (here on a superset of the problems) stand as this
    process's finished share: only the rows they lack are written (a batch they fill is not run; one they
    start runs again whole), and the summary counts both."""
    sampler = ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"]})
    full = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path / "full", batch_size=3)
    rows = [json.loads(line) for line in (tmp_path / "full/eval/greedy/predictions.jsonl").read_text().splitlines()]
    assert seed_results(PROBLEMS[:2], "greedy", rows, tmp_path / "sub") == 2
    assert seed_results(PROBLEMS[:2], "greedy", rows, tmp_path / "sub") == 0  # never over a started part
    calls = len(sampler.calls)
    sub = evaluate_methods(PROBLEMS[:2], _ctx(sampler), ["greedy"], tmp_path / "sub", batch_size=3)
    assert len(sampler.calls) == calls and sub["greedy"]["n"] == 2 and sub["greedy"]["correct"] == 2
    seed_results(PROBLEMS, "greedy", rows[:1], tmp_path / "more")
    more = evaluate_methods(PROBLEMS, _ctx(sampler), ["greedy"], tmp_path / "more", batch_size=3)
    assert sampler.calls[-1][0] == ["q0", "q1", "q2"] and more == full  # the started batch, whole


def test_wilson_interval():
    lo, hi = reporting.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert reporting.wilson_interval(0, 10)[0] == 0.0 and reporting.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_summary_table_shows_no_numbers_for_a_method_with_no_problem():
    rows = [{"correct": True, "generated_tokens": 10, "nodes": 3}, {"correct": False, "generated_tokens": 20, "nodes": 5}]
    table = reporting.markdown_table({"mcts": reporting.summarize(rows), "greedy": reporting.summarize([])})
    assert "| mcts | 50.0% |" in table and "| 15.0 | 4.0 |" in table
    assert "| greedy | - | - | - | 0 | - | - |" in table
    from alphallm_jax.pipeline.loop_report import _pct  # the loop's report cells read the same way

    assert _pct(reporting.summarize([])) == "-" and _pct(reporting.summarize(rows)).startswith("50.0% [")


@pytest.mark.slow
def test_eval_cli_on_arith_and_gsm8k_with_a_tiny_model(tmp_path):
    require_shared_data()
    ckpt = tmp_path / "tiny"
    def run(*args):
        return subprocess.run([sys.executable, "-m", "alphallm_jax.cli", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
    made = run("init-model", "--preset=tiny", f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={ckpt}")
    assert made.returncode == 0, made.stderr[-2000:]
    for config, n in (("configs/demo_arith.py:quick", None), ("configs/gsm8k_eval.py:small", 20)):
        if n is None:  # the demo's quick variant evaluates its first eval.limit test problems
            n = load_config("demo_arith", "quick").eval.limit
        workdir = tmp_path / config.split("/")[1].split(".")[0]
        done = run("eval", f"--config={config}", f"--workdir={workdir}", f"--config.model.checkpoint={ckpt}",
                   "--config.eval.max_new_tokens=24")
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((workdir / "eval/summary.json").read_text())
        assert summary["num_problems"] == n
        for s in summary["methods"].values():
            assert s["n"] == n and 0.0 <= s["accuracy"] <= 1.0 and s["mean_generated_tokens"] > 0
        assert "accuracy" in done.stdout


def _fewshot_arith_config(**arith):
    cfg = default_config()
    cfg.data.prompt_format = "fewshot"
    cfg.data.arith.update(arith)
    return cfg


def test_fewshot_arith_exemplars_come_from_the_runs_own_train_split():
    # The run's seed and generator config make its splits; its exemplars are drawn from that train split,
    # not from the default one (seed 0, default difficulty).
    from alphallm_jax.data.loaders import load_dataset
    from alphallm_jax.data.prompts import question_of_prompt
    from alphallm_jax.pipeline.evaluation import load_eval_problems, load_split, prompt_builder

    cfg = _fewshot_arith_config(min_steps=4, max_steps=5, operand_max=12)
    cfg.seed, cfg.eval.limit = 3, 2
    problem = load_eval_problems(cfg)[0]
    blocks = prompt_builder(cfg, None)(problem).split("\n\n")
    assert len(blocks) == cfg.data.num_exemplars + 1 and question_of_prompt(blocks[-1]) == problem.question
    run_train = {p.question for p in load_split(cfg, "arith:train")}
    default_train = {p.question for p in load_dataset("arith:train")}
    exemplar_questions = [question_of_prompt(b) for b in blocks[:-1]]
    assert all(q in run_train and q not in default_train for q in exemplar_questions)


def test_a_fewshot_evaluation_on_math_test5000_builds_every_prompt_without_a_test_problem(tmp_path):
    # math:train4500 (the MATH exemplar pool) lies inside math:test5000: its exemplars were test problems, and
    # the run died at the first problem that was one of them (format_prompt refuses a problem's own copy).
    from alphallm_jax.data.prompts import question_key
    from alphallm_jax.pipeline.evaluation import config_exemplars, eval_identity, load_eval_problems, prompt_builder

    cfg = default_config()
    cfg.task, cfg.data.prompt_format, cfg.data.data_dir = "math", "fewshot", str(require_shared_data())
    cfg.eval.split = "math:test5000"
    problems = load_eval_problems(cfg)
    exemplars = config_exemplars(cfg, "math")
    assert len(problems) == 5000 and len(exemplars) == cfg.data.num_exemplars
    assert not {question_key(e.question) for e in exemplars} & {question_key(p.question) for p in problems}
    prompt_for = prompt_builder(cfg, None)
    prompts = [prompt_for(p) for p in problems]
    assert all(p.count("Question: ") == cfg.data.num_exemplars + 1 for p in prompts)
    assert all(e.question.strip() in prompts[0] for e in exemplars)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "model.safetensors").write_text("p")
    assert eval_identity(cfg, tmp_path / "policy")["prompt"]["exemplars"]


def test_the_eval_stops_leave_out_the_tasks_step_separator(tmp_path, monkeypatch, caplog):
    # The default eval.stop holds "\n\n", MATH's step separator: a MATH solution stopped after its first
    # paragraph. The evaluation drops it (and says so); it adds no stop.
    import logging

    from alphallm_jax import sampling
    from alphallm_jax.pipeline.evaluation import eval_context, eval_stops

    default = default_config().eval.stop
    assert "\n\n" in default
    with caplog.at_level(logging.INFO, logger="alphallm_jax.pipeline.evaluation"):
        assert eval_stops("math", default) == tuple(s for s in default if s != "\n\n")
        assert len(caplog.records) == 1 and "step separator" in caplog.records[0].getMessage()
        assert eval_stops("gsm8k", default) == tuple(default) and eval_stops("arith", ("\nQuestion:",)) == ("\nQuestion:",)
        assert len(caplog.records) == 1
    assert eval_stops("gsm8k", ("\n", "\n\n")) == ("\n\n",)

    class _Tok:
        def encode(self, text, add_bos=False):
            return [0] * (len(text) + add_bos)

    (tmp_path / "q.jsonl").write_text(json.dumps({"problem": "What is $1+1$?", "solution": "So $\\boxed{2}$."}) + "\n")
    monkeypatch.setattr(sampling, "sampler_from_config", lambda *a, **kw: "sampler")
    cfg = default_config()
    cfg.task, cfg.eval.split = "math", str(tmp_path / "q.jsonl")
    problems, ctx = eval_context(cfg, None, _Tok())
    assert len(problems) == 1 and ctx.sampler == "sampler"
    assert tuple(ctx.eval_cfg.stop) == ("\nQuestion:",) and tuple(cfg.eval.stop) == tuple(default)
    assert ctx.eval_cfg.max_new_tokens == cfg.eval.max_new_tokens
    cfg.task, cfg.eval.split = "arith", "arith:test"
    assert tuple(eval_context(cfg, None, _Tok())[1].eval_cfg.stop) == tuple(default)


def test_an_evaluation_with_other_prompts_or_problems_is_refused_and_the_same_config_resumes(tmp_path):
    from alphallm_jax.pipeline.evaluation import eval_identity

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "model.safetensors").write_text("p")
    sampler = ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"]})

    def evaluate(cfg, problems):
        evaluate_methods(problems, _ctx(sampler), ["greedy"], tmp_path, batch_size=3,
                         identity=eval_identity(cfg, tmp_path / "policy", ["greedy"], tmp_path))

    # Problems read from a file: the arith generator shapes only the exemplars, whose questions and
    # references the per-problem check never sees.
    cfg = _fewshot_arith_config()
    cfg.eval.split = "questions.jsonl"
    evaluate(cfg, PROBLEMS[:2])
    cfg.data.data_dir = str(tmp_path / "elsewhere")  # the same files found elsewhere: still this evaluation
    evaluate(cfg, PROBLEMS)
    assert sampler.calls[-1][0] == ["q0", "q1", "q2"]  # the started batch again, whole
    calls = len(sampler.calls)
    for key, value in (("arith.max_steps", 3), ("num_exemplars", 2), ("exemplar_seed", 1)):
        changed = _fewshot_arith_config()
        changed.eval.split = cfg.eval.split
        changed.update_from_flattened_dict({f"data.{key}": value})
        with pytest.raises(ValueError, match=r"holds results of another run, which differs in .*prompt\.exemplars"):
            evaluate(changed, PROBLEMS)
    assert len(sampler.calls) == calls


def test_a_generated_eval_split_records_its_generator_settings(tmp_path):
    from alphallm_jax.pipeline.evaluation import eval_identity

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "model.safetensors").write_text("p")
    cfg = default_config()  # plain prompts on arith:test
    identity = eval_identity(cfg, tmp_path / "policy")
    assert identity["data"]["arith"] == cfg.data.arith.to_dict() and "exemplars" not in identity["prompt"]
    # arith:test is generated first, from data.arith alone: the hard split's settings do not shape it.
    assert "arith_hard" not in identity["data"]
    cfg.eval.split = "arith:test_hard"  # generated after test, excluding its questions: both shape it
    identity = eval_identity(cfg, tmp_path / "policy")
    assert identity["data"]["arith_hard"] == cfg.data.arith_hard.to_dict()
    evaluate_methods(PROBLEMS, _ctx(ScriptedSampler({"q0": ["#### 12"], "q1": ["#### 7"], "q2": ["#### 30"]})),
                     ["greedy"], tmp_path, batch_size=3, identity=identity)
    cfg.data.arith_hard.value_max = 400
    with pytest.raises(ValueError, match=r"differs in data\.arith_hard\.value_max: 500 -> 400"):
        evaluate_methods(PROBLEMS, _ctx(ScriptedSampler({})), ["greedy"], tmp_path, batch_size=3,
                         identity=eval_identity(cfg, tmp_path / "policy"))
    cfg.eval.split = "gsm8k:test"  # not generated: the rows' questions and references are checked instead
    assert "data" not in eval_identity(cfg, tmp_path / "policy")
