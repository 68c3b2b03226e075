"""orm@k and prm@k in the evaluation harness: the best-scoring sample wins; samples are shared with maj@k."""

from __future__ import annotations

import numpy as np
import pytest

from alphallm_jax.config import default_config
from alphallm_jax.critics.scoring import SolutionScores
from alphallm_jax.data.problems import Problem
from alphallm_jax.pipeline.eval_methods import EvalContext, make_method
from alphallm_jax.sampling import Completion


class ScriptedSampler:
    def __init__(self, answers):
        self.answers = answers
        self.calls = 0

    def generate(self, prompts, *, num_samples, **kw):
        self.calls += 1
        return [[Completion(text=t, token_ids=[3] * len(t), logprobs=[-1.0], finish_reason="eos")
                 for t in self.answers[p][:num_samples]] for p in prompts]


class StubTokenizer:
    def encode(self, text, add_bos=False):
        return [1, 4]


class StubScorer:
    """ORM score: the digit after 'orm'; PRM: the digit after 'prm'; the tool fails texts with 'bad'."""

    tokenizer = StubTokenizer()
    eos_ids = frozenset({2})

    def __init__(self, combined=False):
        self.calls = 0
        self.combined = combined  # orm_combined: the digit after 'comb'
        self.mean_logprobs = None

    def score_solutions(self, prompt_ids, solution_ids, texts, mean_logprobs=None):
        self.calls += 1
        self.mean_logprobs = mean_logprobs
        orm = np.array([int(t.split("orm")[1][0]) / 10 for t in texts], np.float32)
        prm = np.array([int(t.split("prm")[1][0]) / 10 for t in texts], np.float32)
        ok = np.array([0.0 if "bad" in t else 1.0 for t in texts], np.float32)
        comb = np.array([int(t.split("comb")[1][0]) / 10 for t in texts], np.float32) if self.combined else None
        return SolutionScores(orm=orm, orm_tool=orm * ok, tool_ok=ok, prm=prm, value=orm,
                              prm_steps=[np.array([p]) for p in prm], tool_failures=[[] for _ in texts],
                              orm_combined=comb)


ANSWERS = {"q0": ["orm9 prm1 comb1 bad\n#### 5", "orm7 prm2 comb2\n#### 12", "orm1 prm8 comb3\n#### 3",
                  "orm1 prm1 comb9\n#### 5"]}
PROBLEMS = [Problem(id="t-0", question="q0", answer="12", solution=None, task="arith")]


def _ctx(**components):
    cfg = default_config()
    return EvalContext(sampler=ScriptedSampler(ANSWERS), task="arith", prompt_for=lambda p: p.question,
                       eval_cfg=cfg.eval, components=components)


def test_orm_and_prm_rerank_pick_the_best_scoring_sample():
    ctx = _ctx(critic=StubScorer(), sample_cache={})
    orm = make_method("orm@4").run(PROBLEMS, ctx)[0]
    assert orm.prediction.endswith("#### 12")  # the 0.9 sample failed the tool check
    assert orm.extra["tool_ok"] == 3 and orm.extra["score"] == pytest.approx(0.7)
    prm = make_method("prm@4").run(PROBLEMS, ctx)[0]
    assert prm.prediction.endswith("#### 3")
    maj = make_method("maj@4").run(PROBLEMS, ctx)[0]
    assert maj.prediction.endswith("#### 5")
    assert ctx.sampler.calls == 1  # one set of samples served all three methods
    assert orm.generated_tokens == maj.generated_tokens


def test_orm_rerank_uses_the_outcome_combiner_with_each_samples_mean_logprob():
    scorer = StubScorer(combined=True)
    out = make_method("orm@4").run(PROBLEMS, _ctx(critic=scorer, sample_cache={}))[0]
    assert out.prediction.endswith("#### 5") and out.extra["score"] == pytest.approx(0.9)  # comb9 wins
    # ScriptedSampler: len(text) tokens with one log-probability of -1 -> mean -1 / len(text)
    assert scorer.mean_logprobs == pytest.approx([-1.0 / len(t) for t in ANSWERS["q0"]])


def test_rerank_needs_a_critic_and_a_budget():
    with pytest.raises(ValueError, match="needs a critic"):
        make_method("orm@4").run(PROBLEMS, _ctx())
    with pytest.raises(ValueError, match="budget"):
        make_method("prm")


def test_rerank_scores_solutions_without_the_stop_strings_tokens():
    # A sample that ended at the stop string "\n\n" (two newline tokens) is scored as the critic's
    # training rows end, without them: the sampler cuts the tokens to the stripped text's length.
    class StopSampler(ScriptedSampler):
        cuts = []

        def generate(self, prompts, *, num_samples, **kw):
            ends = {"eos": ([0, 1, 2], "orm5 prm5\n#### 5"), "stop": ([0, 1, 2, 1, 1], "orm6 prm6\n#### 5\n\n")}
            return [[Completion(text=ends[r][1], token_ids=ends[r][0], logprobs=[-1.0] * len(ends[r][0]),
                                finish_reason=r) for r in ("eos", "stop")[:num_samples]] for _ in prompts]

        def cut(self, context, token_ids, chars):
            self.cuts.append((list(context), list(token_ids), chars))
            return list(token_ids[:3]), "unused"

    scorer = StubScorer()
    seen = []
    score = scorer.score_solutions
    scorer.score_solutions = lambda p, ids, t, mean_logprobs=None: (seen.append(ids), score(p, ids, t, mean_logprobs))[1]
    cfg = default_config()
    cfg.eval.stop = ("\n\n",)
    ctx = EvalContext(sampler=StopSampler(ANSWERS), task="arith", prompt_for=lambda p: p.question, eval_cfg=cfg.eval,
                      components={"critic": scorer, "sample_cache": {}})
    out = make_method("orm@2").run(PROBLEMS, ctx)[0]
    assert seen == [[[0, 1, 2], [0, 1, 2]]] and out.prediction == "orm6 prm6\n#### 5"
    assert StopSampler.cuts == [([1, 4], [0, 1, 2, 1, 1], len("orm6 prm6\n#### 5"))]  # the eos sample is whole
    assert scorer.mean_logprobs == pytest.approx([-1.0, -1.0])  # the stop tokens' log-probabilities left out
