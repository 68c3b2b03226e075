"""Two policies judged on the same problems: the problems one gets right and the other wrong.

Two accuracies measured on the same 150 problems are not independent samples: most problems are right
(or wrong) for both, and only the discordant ones say which policy is better. The comparison counts
them (`gained`: wrong before, right after; `lost`: the reverse) and gives the exact two-sided McNemar
test: under "neither policy is better" each discordant problem is a fair coin, so
p = min(1, 2 * P[Binomial(gained + lost, 1/2) <= min(gained, lost)]). The loop reports it for every
iteration's SFT (against the policy it started from) and CPL (against that SFT policy), where a few
points of greedy accuracy are otherwise hard to tell from noise.
"""

from __future__ import annotations

import math
from typing import Any

from alphallm_jax.utils.io import PathLike, as_path, read_jsonl


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value of `gained` against `lost` discordant problems (1.0 for none)."""
    if gained < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got gained={gained}, lost={lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def _correct_by_id(path: PathLike) -> dict[str, bool]:
    return {str(r["id"]): bool(r["correct"]) for r in read_jsonl(path)}


def paired_comparison(before: PathLike, after: PathLike) -> dict[str, Any] | None:
    """`after` against `before`, two `predictions.jsonl` files of the evaluation harness, on the problems
    both hold: {"n", "gained", "lost", "delta" (accuracy after - before), "p_value"}; None when a file
    is missing (a method that was not evaluated)."""
    before, after = as_path(before), as_path(after)
    if not before.is_file() or not after.is_file():
        return None
    a, b = _correct_by_id(before), _correct_by_id(after)
    common = sorted(a.keys() & b.keys())
    gained = sum(1 for i in common if b[i] and not a[i])
    lost = sum(1 for i in common if a[i] and not b[i])
    return {"n": len(common), "gained": gained, "lost": lost,
            "delta": (gained - lost) / len(common) if common else 0.0, "p_value": mcnemar_p(gained, lost)}
