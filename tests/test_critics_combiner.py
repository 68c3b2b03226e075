"""The outcome combiner: a penalised logistic regression over (ORM logit, tool verdict, mean log-prob)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alphallm_jax.critics.calibration import auroc
from alphallm_jax.critics.combiner import (
    FEATURES,
    OutcomeCombiner,
    mean_token_logprob,
    rows_mean_logprobs,
    solution_features,
)


def _synthetic(n, seed=0):
    """Three complementary signals of a known logistic model: each alone ranks worse than all three."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.normal(0, 1.5, n), (rng.random(n) < 0.6).astype(float), rng.normal(-0.5, 0.2, n)], 1)
    true_w, true_b = np.array([0.8, 2.5, 6.0]), 0.5
    p = 1 / (1 + np.exp(-(x @ true_w + true_b)))
    return x, (rng.random(n) < p).astype(float), p, (true_w, true_b)


def test_fit_recovers_a_known_logistic_model():
    x, y, p_true, (w, b) = _synthetic(20000)
    c = OutcomeCombiner.fit(x, y, l2=1e-3)
    raw_w = np.asarray(c.weights) / np.asarray(c.scale)  # back to the unstandardised features
    raw_b = c.bias - float(np.sum(np.asarray(c.mean) * raw_w))
    assert raw_w == pytest.approx(w, rel=0.1) and raw_b == pytest.approx(b, abs=0.25)
    assert np.max(np.abs(c.predict(x) - p_true)) < 0.05
    xt, yt, _, _ = _synthetic(4000, seed=1)
    combined = auroc(c.predict(xt), yt)
    for j in range(3):  # held out: the combination ranks better than any one feature
        single = auroc(1 / (1 + np.exp(-xt[:, j])), yt)
        assert combined > single + 0.02, (FEATURES[j], combined, single)


def test_a_stronger_penalty_shrinks_the_weights():
    x, y, _, _ = _synthetic(500)
    loose, tight = OutcomeCombiner.fit(x, y, l2=1e-3), OutcomeCombiner.fit(x, y, l2=1e3)
    assert np.sum(np.abs(tight.weights)) < 0.5 * np.sum(np.abs(loose.weights))
    assert abs(float(np.mean(tight.predict(x))) - float(np.mean(y))) < 0.05  # the bias is not penalised


def test_save_load_roundtrip_and_errors(tmp_path):
    x, y, _, _ = _synthetic(300)
    c = OutcomeCombiner.fit(x, y)
    c.save(tmp_path / "combiner.json")
    again = OutcomeCombiner.load(tmp_path / "combiner.json")
    assert again == c and np.array_equal(again.predict(x), c.predict(x))
    d = json.loads((tmp_path / "combiner.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**d, "features": ["orm_logit", "tool_ok"]}))
    with pytest.raises(ValueError, match="other.json.*features"):
        OutcomeCombiner.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="all wrong"):
        OutcomeCombiner.fit(x, np.zeros(len(x)))
    with pytest.raises(ValueError, match="do not match"):
        OutcomeCombiner.fit(x[:, :2], y)
    with pytest.raises(ValueError, match="non-finite feature in solution 1"):
        solution_features([0.5, 0.5], [1.0, 1.0], [-0.1, float("nan")])


def test_features_and_mean_logprob():
    f = solution_features([0.5, 0.9, 1.0], [1.0, 0.0, 1.0], [-0.2, -1.0, 0.0])
    assert f[:, 0] == pytest.approx([0.0, np.log(9.0), np.log((1 - 1e-6) / 1e-6)])  # ORM logit, clipped
    assert f[:, 1].tolist() == [1.0, 0.0, 1.0] and f[:, 2].tolist() == [-0.2, -1.0, 0.0]
    assert mean_token_logprob(-3.0, 3) == pytest.approx(-1.0)
    assert mean_token_logprob(0.0, 0) == 0.0
    rows = [{"step_logprobs": [-1.0, -2.0], "step_ids": [[5, 6], [7]]}, {"step_logprobs": [], "step_ids": []}]
    assert rows_mean_logprobs(rows) == pytest.approx([-1.0, 0.0])
    assert rows_mean_logprobs([{"step_ids": [[5]]}]) is None  # data built before rows kept log-probs


def test_scorer_gives_the_combined_score_only_with_log_probabilities(tmp_path):
    from alphallm_jax.critics.scoring import CriticScorer
    from tests.tiny_lm import arith_tokenizer, random_critic

    tokenizer = arith_tokenizer(tmp_path)
    x, y, _, _ = _synthetic(300)
    combiner = OutcomeCombiner.fit(x, y)
    scorer = CriticScorer(random_critic(tokenizer, seed=1), tokenizer, task="arith", combiner=combiner)
    texts = ["3+4=<<3+4=7>>7\n#### 7", "3+4=<<3+4=8>>8\n#### 8"]
    prompts, sols = [tokenizer.encode("Question: 3+4?\nAnswer:\n", add_bos=True)] * 2, [tokenizer.encode(t) for t in texts]
    plain = scorer.score_solutions(prompts, sols, texts)
    assert plain.orm_combined is None
    s = scorer.score_solutions(prompts, sols, texts, mean_logprobs=[-0.3, -0.1])
    assert s.tool_ok.tolist() == [1.0, 0.0]
    expected = combiner.predict(solution_features(s.orm, s.tool_ok, [-0.3, -0.1]))
    assert s.orm_combined == pytest.approx(expected)
    with pytest.raises(ValueError, match="1 mean_logprobs for 2 solutions"):
        scorer.score_solutions(prompts, sols, texts, mean_logprobs=[-0.3])


def test_scorer_checks_question_numbers_against_the_decoded_prompt(tmp_path):
    """`critics.tools.question_numbers`: the scorer decodes each prompt's question and flags a complete
    solution that leaves one of its numbers unused."""
    from alphallm_jax.critics.scoring import CriticScorer
    from alphallm_jax.critics.tools import ToolConfig
    from tests.tiny_lm import arith_tokenizer, random_critic

    tokenizer = arith_tokenizer(tmp_path)
    critic = random_critic(tokenizer, seed=1)
    texts = ["3+4=<<3+4=7>>7\n#### 7", "3+3=<<3+3=6>>6\n#### 6"]
    prompts = [tokenizer.encode("Question: 3+4?\nAnswer:\n", add_bos=True)] * 2
    sols = [tokenizer.encode(t) for t in texts]
    off = CriticScorer(critic, tokenizer, task="arith")
    assert off.score_solutions(prompts, sols, texts).tool_ok.tolist() == [1.0, 1.0]
    on = CriticScorer(critic, tokenizer, task="arith", tools=ToolConfig(question_numbers=True))
    s = on.score_solutions(prompts, sols, texts)
    assert s.tool_ok.tolist() == [1.0, 0.0]
    assert s.tool_failures[1] == ["question numbers never used in a calculation: 4"]
    # A prompt the question cannot be read from (a chat prompt, free text) fails the configured check
    # out loud instead of skipping it; the config check stops a chat-format run before any stage.
    free = [tokenizer.encode("3+4?\n", add_bos=True)] * 2
    with pytest.raises(ValueError, match="question_numbers and critics.tools.operand_sources read the question"):
        on.score_solutions(free, sols, texts)
    assert off.score_solutions(free, sols, texts).tool_ok.tolist() == [1.0, 1.0]
    from alphallm_jax.config import default_config
    from alphallm_jax.critics.pipeline import tool_config
    from alphallm_jax.pipeline.loop import derived_config

    chat = derived_config(default_config(), **{"data.prompt_format": "chat", "critics.tools.operand_sources": True})
    with pytest.raises(ValueError, match="data.prompt_format='chat'"):
        tool_config(chat)
    assert tool_config(derived_config(chat, **{"critics.tools.operand_sources": False})).operand_sources is False
