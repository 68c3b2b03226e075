"""The outcome combiner: one calibrated probability that a complete solution is right, from the ORM, the
tool checks and the policy's own confidence.

Features per solution: the ORM head's logit, the tool verdict (1 passes, 0 flagged) and the policy's mean
token log-probability over the solution (its confidence, free: the sampler returns it with every token).
A logistic regression over the standardised features, fitted by Newton's method with an L2 penalty on the
critic's training trajectories (never the dev split it is calibrated on), gives `orm_combined`. On the
demo the three disagree usefully: the calculator sees arithmetic slips, the ORM hardly ranks the
calculator-clean solutions, and the policy's confidence does (see README).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alphallm_jax.utils.io import PathLike, atomic_write_json, read_json

FEATURES = ("orm_logit", "tool_ok", "mean_logprob")
COMBINER_FILE = "combiner.json"


def solution_features(orm: Sequence[float], tool_ok: Sequence[float],
                      mean_logprob: Sequence[float]) -> np.ndarray:
    """[N, 3] features in `FEATURES` order; the ORM probability enters as its logit (clipped at 1e-6)."""
    p = np.clip(np.asarray(orm, np.float64), 1e-6, 1 - 1e-6)
    x = np.stack([np.log(p / (1 - p)), np.asarray(tool_ok, np.float64), np.asarray(mean_logprob, np.float64)], 1)
    if not np.all(np.isfinite(x)):
        bad = int(np.argmax(~np.all(np.isfinite(x), 1)))
        raise ValueError(f"outcome combiner: non-finite feature in solution {bad}: "
                         f"{dict(zip(FEATURES, x[bad].tolist()))}")
    return x


@dataclasses.dataclass(frozen=True)
class OutcomeCombiner:
    mean: tuple[float, ...]  # feature standardisation, fitted with the weights
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # per standardised feature
    bias: float
    l2: float
    train_examples: int
    train_positive_rate: float

    @classmethod
    def fit(cls, x_nf: np.ndarray, y_n: Sequence[float], *, l2: float = 1.0, max_iter: int = 100) -> OutcomeCombiner:
        """Penalised maximum likelihood (the bias is not penalised); Newton steps until the step is tiny."""
        x_nf = np.asarray(x_nf, np.float64)
        y_n = np.asarray(y_n, np.float64)
        if x_nf.ndim != 2 or x_nf.shape[1] != len(FEATURES) or x_nf.shape[0] != y_n.shape[0]:
            raise ValueError(f"outcome combiner: features {x_nf.shape} and labels {y_n.shape} do not match "
                             f"[N, {len(FEATURES)}] and [N]")
        if not 0 < y_n.mean() < 1:
            raise ValueError(f"outcome combiner: the {len(y_n)} training solutions are all "
                             f"{'right' if y_n.mean() else 'wrong'}; nothing to fit")
        mean = x_nf.mean(0)
        scale = np.where(x_nf.std(0) > 1e-12, x_nf.std(0), 1.0)
        z = np.concatenate([(x_nf - mean) / scale, np.ones((len(y_n), 1))], 1)
        penalty = np.diag([l2] * len(FEATURES) + [0.0])
        w = np.zeros(z.shape[1])
        for _ in range(max_iter):
            p = _sigmoid(z @ w)
            grad = z.T @ (p - y_n) + penalty @ w
            hess = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.max(np.abs(step)) < 1e-10:
                break
        return cls(tuple(mean.tolist()), tuple(scale.tolist()), tuple(w[:-1].tolist()), float(w[-1]), float(l2),
                   int(len(y_n)), float(y_n.mean()))

    def predict(self, x_nf: np.ndarray) -> np.ndarray:
        """P(right) per solution, float32."""
        z = (np.asarray(x_nf, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(z @ np.asarray(self.weights) + self.bias).astype(np.float32)

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), **dataclasses.asdict(self)}

    def save(self, path: PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> OutcomeCombiner:
        d = read_json(path)
        if d.get("features") != list(FEATURES):
            raise ValueError(f"{path}: features {d.get('features')} are not this version's {list(FEATURES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def mean_token_logprob(summed_logprob: float, num_tokens: int) -> float:
    """A solution's mean token log-probability (0 without tokens), the combiner's third feature: the same
    for a sample's per-token log-probs (`orm@k`) and a data row's per-step sums (`rows_mean_logprobs`)."""
    return float(summed_logprob) / max(int(num_tokens), 1)


def rows_mean_logprobs(rows: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Each critic data row's mean token log-probability; None when a row lacks `step_logprobs` (data
    built before rows recorded them)."""
    if any("step_logprobs" not in r for r in rows):
        return None
    return [mean_token_logprob(np.sum(r["step_logprobs"]), sum(len(s) for s in r["step_ids"])) for r in rows]
