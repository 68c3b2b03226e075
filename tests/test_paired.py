"""Paired comparison of two policies' predictions: discordant counts and the exact McNemar test."""

from __future__ import annotations

import json
import math

import pytest

from alphallm_jax.pipeline.loop_report import markdown
from alphallm_jax.pipeline.paired import mcnemar_p, paired_comparison


def test_mcnemar_by_hand():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0  # a tie: the two-sided tail sum passes 1 and is capped
    assert mcnemar_p(2, 12) == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)  # 0.0129
    assert mcnemar_p(12, 2) == mcnemar_p(2, 12)  # symmetric
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    # against summing the binomial pmf directly
    n, k = 30, 9
    assert mcnemar_p(k, n - k) == pytest.approx(2 * sum(math.comb(n, i) * 0.5 ** n for i in range(k + 1)))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_p(-1, 2)


def _write(path, correct_by_id):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "correct": c, "prediction": "x"}) + "\n"
                            for i, c in correct_by_id.items()))
    return path


def test_paired_comparison_counts_only_common_problems(tmp_path):
    before = _write(tmp_path / "a.jsonl", {"p1": True, "p2": False, "p3": False, "p4": True, "only_a": True})
    after = _write(tmp_path / "b.jsonl", {"p1": True, "p2": True, "p3": True, "p4": False, "only_b": False})
    r = paired_comparison(before, after)
    assert r == {"n": 4, "gained": 2, "lost": 1, "delta": pytest.approx(0.25), "p_value": pytest.approx(1.0)}
    assert paired_comparison(before, tmp_path / "missing.jsonl") is None


def test_the_loop_report_shows_paired_rows():
    it = {"iteration": 1, "synthesized_prompts": 64, "sft_traces": 16, "sft": {"greedy": {"accuracy": 0.4}},
          "cpl": {"greedy": {"accuracy": 0.41}},
          "paired_greedy": {"sft": {"n": 150, "gained": 9, "lost": 12, "delta": -0.02, "p_value": 0.66}, "cpl": None}}
    md = markdown({"iterations": [it]})
    assert "| 1 | -2.0 points: +9 / -12 of 150, p = 0.66 | - |" in md
    assert "paired on the same problems" not in markdown({"iterations": [{**it, "paired_greedy": {"sft": None}}]})
