"""Calibration of a critic's probabilities against 0/1 labels: precision, recall, ECE, AUROC, Brier.

* precision / recall of "score >= threshold" as the positive prediction (threshold 0.5 by default);
* ECE: `sum_b n_b / N * |mean label_b - mean score_b|` over `num_bins` equal-width bins of [0, 1];
* AUROC: the probability that a random positive scores above a random negative, ties counted half
  (the Mann-Whitney U statistic with average ranks); None when one class is missing;
* Brier: mean squared error of the scores;
* an AUROC interval by the cluster bootstrap: whole groups (the dev prompts) are resampled with
  replacement, since a prompt's solutions and states share its difficulty and are not independent
  draws; the interval is the percentile range of the resamples' AUROCs.
The paper reports value 0.82 / 0.79 / 0.032 and PRM 0.62 / 0.90 / 0.375 (precision / recall / ECE).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAPER_REFERENCE = {
    "value": {"precision": 0.82, "recall": 0.79, "ece": 0.032},
    "prm": {"precision": 0.62, "recall": 0.90, "ece": 0.375},
}


def _arrays(scores: Sequence[float], labels: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if s.size and (np.nanmin(s) < 0 or np.nanmax(s) > 1):
        raise ValueError("scores must be probabilities in [0, 1]")
    return s, y


def precision_recall(scores, labels, threshold: float = 0.5) -> tuple[float | None, float | None]:
    """Precision and recall of `score >= threshold` (None where the denominator is 0)."""
    s, y = _arrays(scores, labels)
    pred = s >= threshold
    pos = y > 0.5
    tp = float(np.sum(pred & pos))
    precision = tp / float(np.sum(pred)) if np.any(pred) else None
    recall = tp / float(np.sum(pos)) if np.any(pos) else None
    return precision, recall


def expected_calibration_error(scores, labels, num_bins: int = 10) -> float | None:
    """Equal-width-bin ECE; bin b holds scores in [b/B, (b+1)/B), the last bin includes 1.0."""
    s, y = _arrays(scores, labels)
    if s.size == 0:
        return None
    bins = np.minimum((s * num_bins).astype(np.int64), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if np.any(in_bin):
            ece += np.sum(in_bin) / s.size * abs(float(np.mean(y[in_bin])) - float(np.mean(s[in_bin])))
    return float(ece)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first index of each run of ties
    ends = np.r_[starts[1:], x.size] - 1
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat((starts + ends) / 2.0 + 1.0, ends - starts + 1)
    return ranks


def _ordered_pairs(s: np.ndarray, pos: np.ndarray) -> tuple[float, int]:
    """(positive-above-negative pairs, ties counting half; all positive-negative pairs): Mann-Whitney U."""
    n_pos, n_neg = int(np.sum(pos)), int(np.sum(~pos))
    if n_pos == 0 or n_neg == 0:
        return 0.0, 0
    return float(np.sum(_average_ranks(s)[pos]) - n_pos * (n_pos + 1) / 2.0), n_pos * n_neg


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve (ties count half); None when all labels are the same."""
    s, y = _arrays(scores, labels)
    ordered, pairs = _ordered_pairs(s, y > 0.5)
    return ordered / pairs if pairs else None


def within_group_auroc(scores, labels, groups) -> tuple[float | None, int]:
    """AUROC over the (positive, negative) pairs that share a group (ties count half), and the number of
    such pairs; None when no group holds both classes. With groups = prompts it measures the order
    best-of-N reranking uses, which scores need not share across prompts."""
    s, y = _arrays(scores, labels)
    g = np.asarray(groups)
    if g.shape != s.shape:
        raise ValueError(f"{g.size} groups for {s.size} scores")
    ordered, pairs = 0.0, 0
    for key in np.unique(g):
        members = g == key
        o, n = _ordered_pairs(s[members], y[members] > 0.5)
        ordered, pairs = ordered + o, pairs + n
    return (ordered / pairs if pairs else None), pairs


def auroc_interval(scores, labels, groups, *, level: float = 0.95, num_resamples: int = 1000,
                   seed: int = 0) -> tuple[float, float] | None:
    """The `level` percentile interval of the AUROC over `num_resamples` cluster-bootstrap resamples (whole
    groups drawn with replacement; resamples holding one class are skipped); None when fewer
    than half the resamples hold both classes or the labels hold one class."""
    s, y = _arrays(scores, labels)
    g = np.asarray(groups)
    if g.shape != s.shape:
        raise ValueError(f"{g.size} groups for {s.size} scores")
    if not 0 < level < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < level < 1 and num_resamples >= 1, got {level}, {num_resamples}")
    if np.all(y > 0.5) or not np.any(y > 0.5):  # one class: no AUROC to bound
        return None
    _, inverse = np.unique(g, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="mergesort"), np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        ordered, pairs = _ordered_pairs(s[idx], y[idx] > 0.5)
        if pairs:
            values.append(ordered / pairs)
    if len(values) < num_resamples / 2:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def calibration_metrics(scores, labels, *, threshold: float = 0.5, num_bins: int = 10, groups=None,
                        num_resamples: int = 1000, seed: int = 0) -> dict:
    """Every metric of the module for one critic, as a JSON-ready dict; with `groups` (and
    `num_resamples` > 0) also `auroc_ci`, the 95% cluster-bootstrap interval of the AUROC ([None, None]
    where `auroc_interval` gives none)."""
    s, y = _arrays(scores, labels)
    precision, recall = precision_recall(s, y, threshold)
    ci = {}
    if groups is not None and num_resamples > 0:  # [None, None] where undefined: one JSON shape for every run
        ci = {"auroc_ci": list(auroc_interval(s, y, groups, num_resamples=num_resamples, seed=seed) or (None, None))}
    return {
        "n": int(s.size),
        "positive_rate": float(np.mean(y > 0.5)) if s.size else None,
        "mean_score": float(np.mean(s)) if s.size else None,
        "precision": precision,
        "recall": recall,
        "ece": expected_calibration_error(s, y, num_bins),
        "auroc": auroc(s, y),
        **ci,
        "brier": float(np.mean((s - y) ** 2)) if s.size else None,
        "threshold": threshold,
        "num_bins": num_bins,
    }


def metric_text(x) -> str:
    """A calibration metric with three decimals, or "-" where it is undefined (None: e.g. AUROC on a
    split of one class)."""
    return "-" if x is None else f"{x:.3f}"


def has_auroc_interval(m) -> bool:
    """Whether a metrics dict carries a defined AUROC interval."""
    return (m.get("auroc_ci") or [None])[0] is not None


def auroc_text(m) -> str:
    """A metrics dict's AUROC with its interval where there is one: `0.580 (0.512-0.641)`."""
    ci = m.get("auroc_ci")
    return metric_text(m.get("auroc")) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if has_auroc_interval(m) else "")
