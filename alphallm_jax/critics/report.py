"""The calibration report: each critic scored on the dev rollouts and measured against its labels.

Labels (fixed in advance, one primary per critic, a secondary where the definition is debatable):
  * value: every non-terminal state s_0 .. s_{K-1} of each dev trajectory, label = that trajectory's
    graded outcome (a sample of the expected reward v(s) estimates); the MC targets are compared too;
  * PRM: every step, label = the step is "correct" by Monte-Carlo (some outcome continuing from it
    reaches the right answer; Math-Shepherd's hard estimate); secondary: the trajectory's outcome;
  * ORM: every dev trajectory, label = graded outcome; also the tool-augmented ORM, the tools alone and
    the outcome combiner (`orm_combined`: ORM, tools and the policy's confidence; fitted on train rows);
  * value and PRM with the tool checks of each state's text folded in (`value_tool`, `prm_tool`: what
    the search scores with `critics.tools.steps`), against the same labels.
One forward pass per trajectory gives every state's value, every step's PRM and the ORM.

`value_reference` says how much of a trajectory's outcome its states already decide, against how much
the value head reads of it: on the non-root states that have rollout rows of their own (sampled from
that exact prefix, so the trajectory's own continuation is not among them), the AUROC of those
rollouts' mean outcome (a few-sample estimate of v(s), so a lower bound of what a perfect value function
would reach), of the value head, and of the tool checks alone, all against the trajectory's outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alphallm_jax.critics.calibration import (
    PAPER_REFERENCE,
    auroc_text,
    calibration_metrics,
    has_auroc_interval,
    metric_text,
    within_group_auroc,
)
from alphallm_jax.critics.combiner import rows_mean_logprobs
from alphallm_jax.critics.data import row_solution_ids, row_tokens, trajectory_read_points
from alphallm_jax.critics.scoring import CriticScorer
from alphallm_jax.critics.tools import check_solutions, combine_with_checks

TABLE_ORDER = ("value", "value_tool", "prm", "prm_tool", "orm", "orm_tool", "orm_combined", "tools_only",
               "prm_solution")


def calibration_report(scorer: CriticScorer, rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.5,
                       num_bins: int = 10, bootstrap: int = 1000) -> dict:
    """Every critic against its labels on the dev `rows`; `bootstrap` resamples of the dev prompts give
    each AUROC a 95% interval (`auroc_ci`; 0: none)."""
    trajs = [r for r in rows if r["kind"] == "trajectory"]
    if not trajs:
        raise ValueError("no trajectory rows to calibrate on")
    seqs = [row_tokens(r) for r in trajs]
    ends = [trajectory_read_points(r)[0] for r in trajs]
    scores = scorer.score(seqs, step_ends=ends)
    solutions = scorer.score_solutions([r["prompt_ids"] for r in trajs], [row_solution_ids(r) for r in trajs],
                                       [r["text"] for r in trajs], mean_logprobs=rows_mean_logprobs(trajs))

    value_s, value_y, value_mc, value_ok, value_g = [], [], [], [], []
    prm_s, prm_hard, prm_outcome, prm_ok, prm_g = [], [], [], [], []
    rollouts = _rollouts_by_state(rows)
    ref_mc, ref_value, ref_ok, ref_y, ref_n, ref_g = [], [], [], [], [], []
    for r, v_k, p_k in zip(trajs, scores.value_steps, scores.prm_steps):
        k_total = len(r["step_ids"])
        ok_k = _prefix_checks(scorer, r["prompt_ids"], r["step_ids"])  # ok_k[k]: steps 1..k pass the tools
        for k in range(k_total):  # non-terminal states
            value_s.append(v_k[k])
            value_y.append(float(r["correct"]))
            value_mc.append(r["state_hits"][k] / max(r["state_counts"][k], 1))
            value_ok.append(ok_k[k])
            value_g.append(r["problem_id"])
            outcomes = rollouts.get(_state_key(r["problem_id"], k, r["step_ids"])) if k else None
            if outcomes:
                ref_mc.append(float(np.mean(outcomes)))
                ref_value.append(v_k[k])
                ref_ok.append(ok_k[k])
                ref_y.append(float(r["correct"]))
                ref_n.append(len(outcomes))
                ref_g.append(r["problem_id"])
        for k in range(1, k_total + 1):
            if not r["step_ids"][k - 1]:
                continue
            prm_s.append(p_k[k])
            prm_hard.append(float(r["state_hits"][k] > 0))
            prm_outcome.append(float(r["correct"]))
            prm_ok.append(ok_k[k])
            prm_g.append(r["problem_id"])
    orm_y = np.asarray([float(r["correct"]) for r in trajs])

    prompts = [r["problem_id"] for r in trajs]

    def metrics(s, y, groups):  # groups: each item's prompt, the unit the AUROC interval resamples
        return calibration_metrics(np.asarray(s, np.float64), np.asarray(y, np.float64), threshold=threshold,
                                   num_bins=num_bins, groups=groups, num_resamples=bootstrap)

    def solution_metrics(s):  # + right against wrong solutions of one prompt: what reranking compares
        within, pairs = within_group_auroc(np.asarray(s, np.float64), orm_y, prompts)
        return {**metrics(s, orm_y, prompts), "within_prompt_auroc": within, "within_prompt_pairs": pairs}

    value_s = np.asarray(value_s, np.float64)
    value_mc = np.asarray(value_mc, np.float64)
    report = {
        "value": {**metrics(value_s, value_y, value_g), "label": "trajectory outcome at each non-terminal state",
                  "mc_target_mae": float(np.mean(np.abs(value_s - value_mc))) if value_s.size else None,
                  "mc_target_corr": _corr(value_s, value_mc)},
        "prm": {**metrics(prm_s, prm_hard, prm_g), "label": "step reaches the answer in some MC continuation",
                "vs_outcome": metrics(prm_s, prm_outcome, prm_g)},
        "value_tool": {**metrics(combine_with_checks(value_s, value_ok, scorer.tools), value_y, value_g),
                       "combine": scorer.tools.combine},
        "prm_tool": {**metrics(combine_with_checks(prm_s, prm_ok, scorer.tools), prm_hard, prm_g),
                     "combine": scorer.tools.combine},
        "orm": {**solution_metrics(solutions.orm), "label": "graded outcome of each dev trajectory"},
        "orm_tool": {**solution_metrics(solutions.orm_tool), "combine": scorer.tools.combine},
        "tools_only": {**solution_metrics(solutions.tool_ok),
                       "fraction_flagged": float(np.mean(solutions.tool_ok < 0.5))},
        "prm_solution": {**solution_metrics(solutions.prm), "aggregate": scorer.prm_aggregate},
        **({"orm_combined": {**solution_metrics(solutions.orm_combined),
                             "combiner": scorer.combiner.to_dict()}} if solutions.orm_combined is not None else {}),
        "value_reference": {
            "label": "trajectory outcome at each non-root state with rollouts of its own",
            "states": len(ref_y), "rollouts_per_state": float(np.mean(ref_n)) if ref_n else None,
            "positive_rate": float(np.mean(ref_y)) if ref_y else None,
            "heldout_mc": metrics(ref_mc, ref_y, ref_g), "value": metrics(ref_value, ref_y, ref_g),
            "tools_only": metrics(ref_ok, ref_y, ref_g)},
        "dev_trajectories": len(trajs),
        "dev_accuracy": float(np.mean(orm_y)),
        "paper_reference": PAPER_REFERENCE,
    }
    return report


def _state_key(problem_id: str, k: int, step_ids: Sequence[Sequence[int]]) -> tuple:
    """A prefix state s_k of one problem: the tokens of its first k steps (as the data pools states)."""
    return problem_id, tuple(t for step in step_ids[:k] for t in step)


def _rollouts_by_state(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, list[float]]:
    """The graded outcomes of the rollout rows, by the state they were sampled from."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == "rollout":
            out.setdefault(_state_key(r["problem_id"], r["from_step"], r["step_ids"]), []).append(float(r["correct"]))
    return out


def _prefix_checks(scorer: CriticScorer, prompt_ids: Sequence[int], step_ids: Sequence[Sequence[int]]
                   ) -> list[float]:
    """1.0 / 0.0 per state k = 0 .. K: whether the text of the first k steps passes the tool checks (those
    of a partial solution, as the search checks its states)."""
    if scorer.tokenizer is None:
        raise ValueError("the calibration report's tool columns need the scorer's tokenizer")
    texts = [scorer.tokenizer.decode([t for step in step_ids[:k] for t in step]) for k in range(len(step_ids) + 1)]
    questions = (scorer.questions([prompt_ids])[0],) * len(texts) if scorer.tools.needs_question else None
    return [float(c.ok) for c in check_solutions(texts, scorer.task, scorer.tools, questions, complete=False)]


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def report_markdown(report: Mapping[str, Any]) -> str:
    lines = ["# Critic calibration (dev split)", "",
             f"{report['dev_trajectories']} dev trajectories, policy accuracy {100 * report['dev_accuracy']:.1f}%.",
             "", "| critic | n | precision | recall | ECE | AUROC (95% interval) | Brier | label |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name in TABLE_ORDER:
        if name not in report:
            continue
        m = report[name]
        lines.append(f"| {name} | {m['n']} | {metric_text(m['precision'])} | {metric_text(m['recall'])} | {metric_text(m['ece'])} | "
                     f"{auroc_text(m)} | {metric_text(m['brier'])} | {m.get('label', '')} |")
    within = [(name, report[name]) for name in TABLE_ORDER
              if "within_prompt_auroc" in report.get(name, {})]
    if within:
        lines += ["", "Within a prompt (right against wrong solutions of the same problem, the order best-of-N "
                  f"reranking uses; {within[0][1]['within_prompt_pairs']} pairs), AUROC: " +
                  ", ".join(f"{name} {metric_text(m['within_prompt_auroc'])}" for name, m in within) + "."]
    vref = report.get("value_reference") or {}
    if vref.get("states"):
        lines += ["", f"How much the states decide: on {vref['states']} non-root states with rollouts of their own "
                  f"({vref['rollouts_per_state']:.1f} per state; the trajectory's own continuation not among them), "
                  f"AUROC against the trajectory's outcome: the rollouts' mean {auroc_text(vref['heldout_mc'])}, "
                  f"the value head {auroc_text(vref['value'])}, the tool checks alone "
                  f"{auroc_text(vref['tools_only'])}."]
    if any(has_auroc_interval(report.get(name, {})) for name in TABLE_ORDER):
        lines += ["", "AUROC intervals: 95% percentile intervals over resamples of the dev prompts (a prompt's "
                  "solutions and states share its difficulty, so the prompt is the unit drawn)."]
    ref = report["paper_reference"]
    lines += ["", "Paper (precision / recall / ECE): value " +
              " / ".join(str(ref["value"][k]) for k in ("precision", "recall", "ece")) + "; PRM " +
              " / ".join(str(ref["prm"][k]) for k in ("precision", "recall", "ece")) + "."]
    return "\n".join(lines) + "\n"

