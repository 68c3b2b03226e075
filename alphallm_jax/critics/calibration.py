"""Calibration of a critic's probabilities against 0/1 labels: precision, recall, ECE, AUROC, Brier.

* precision / recall of "score >= threshold" as the positive prediction (threshold 0.5 by default);
* ECE: `sum_b n_b / N * |mean label_b - mean score_b|` over `num_bins` equal-width bins of [0, 1];
* AUROC: the probability that a random positive scores above a random negative, ties counted half
  (the Mann-Whitney U statistic with average ranks); None when one class is missing;
* Brier: mean squared error of the scores.
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
    ranks = np.empty(x.size, np.float64)
    start = 0
    while start < x.size:
        end = start
        while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
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


def calibration_metrics(scores, labels, *, threshold: float = 0.5, num_bins: int = 10) -> dict:
    """Every metric of the module for one critic, as a JSON-ready dict."""
    s, y = _arrays(scores, labels)
    precision, recall = precision_recall(s, y, threshold)
    return {
        "n": int(s.size),
        "positive_rate": float(np.mean(y > 0.5)) if s.size else None,
        "mean_score": float(np.mean(s)) if s.size else None,
        "precision": precision,
        "recall": recall,
        "ece": expected_calibration_error(s, y, num_bins),
        "auroc": auroc(s, y),
        "brier": float(np.mean((s - y) ** 2)) if s.size else None,
        "threshold": threshold,
        "num_bins": num_bins,
    }


def metric_text(x) -> str:
    """A calibration metric with three decimals, or "-" where it is undefined (None: e.g. AUROC on a
    split of one class)."""
    return "-" if x is None else f"{x:.3f}"
