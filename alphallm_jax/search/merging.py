"""State merging: near-duplicate options are resampled so siblings stay diverse.

A new option whose distance to an existing sibling is below the threshold is resampled, at most
`max_resample` times; then, of all the samples drawn for that slot, the one farthest from its siblings
is kept. Distance is the character edit distance (duplicate when < threshold) or, as an option, the
cosine similarity of option embeddings (duplicate when >= threshold).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from alphallm_jax.search.mcts_config import MCTSConfig


def edit_distance(a: str, b: str, max_distance: int | None = None) -> int:
    """Levenshtein distance between two strings (unit-cost insert, delete, substitute; code points).

    Bit-parallel (Myers 1999, Hyyro's formulation for the global distance) over Python integers used
    as bit vectors as long as the shorter string: O(len(longer)) big-integer operations. With
    `max_distance`, returns min(distance, max_distance) and stops as soon as the bound is certain.
    """
    if max_distance is not None and max_distance <= 0:
        return 0
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # b, the shorter, is the bit-vector pattern
    cap = math.inf if max_distance is None else max_distance
    n, m = len(a), len(b)
    if m == 0 or n - m >= cap:
        return int(min(n, cap))  # the length difference is a lower bound
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << m) - 1
    last_row = 1 << (m - 1)
    plus_v, minus_v, score = full, 0, m  # vertical deltas of the current column; score = D[m][j]
    for j, ch in enumerate(a, start=1):
        eq = masks.get(ch, 0)
        x_v = eq | minus_v
        x_h = (((eq & plus_v) + plus_v) ^ plus_v) | eq
        plus_h = minus_v | (~(x_h | plus_v) & full)
        minus_h = plus_v & x_h
        if plus_h & last_row:
            score += 1
        elif minus_h & last_row:
            score -= 1
        plus_h = ((plus_h << 1) | 1) & full  # D[0][j] = j: the top row always rises by one
        minus_h = (minus_h << 1) & full
        plus_v = minus_h | (~(x_v | plus_h) & full)
        minus_v = plus_h & x_v
        if score - (n - j) >= cap:  # each remaining column lowers D[m][.] by at most one
            return int(cap)
    return int(min(score, cap))


def cosine_similarity(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine of the angle between two vectors; 0 when either is all zeros."""
    u, v = np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()
    if u.shape != v.shape:
        raise ValueError(f"embeddings of different sizes: {u.shape} and {v.shape}")
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(u @ v) / norm if norm > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class OptionSample:
    """What merging looks at in an option: its text and, for cosine merging, its embedding."""

    text: str
    embedding: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class MergeDecision:
    action: str  # "accept": keep the latest sample | "resample": draw again | "keep": keep samples[index]
    index: int | None = None  # which sample to keep (accept: the latest; keep: the most distant)


@dataclasses.dataclass(frozen=True)
class MergePolicy:
    distance: str = "edit"  # edit | cosine | none
    threshold: float = 20.0
    max_resample: int = 5

    @classmethod
    def from_config(cls, config: MCTSConfig) -> MergePolicy:
        return cls(config.merge_distance, config.merge_threshold, config.max_resample)

    def separation(self, sample: OptionSample, siblings: Sequence[OptionSample]) -> float:
        """How far `sample` is from its nearest sibling: edit distance (capped at the threshold, which
        is exact below it) or 1 - cosine similarity. +inf without siblings or with merging off."""
        if self.distance == "none" or not siblings:
            return math.inf
        if self.distance == "edit":
            cap = max(1, math.ceil(self.threshold))
            return float(min(edit_distance(sample.text, s.text, cap) for s in siblings))
        if sample.embedding is None or any(s.embedding is None for s in siblings):
            raise ValueError("cosine state merging needs an embedding for every option")
        return 1.0 - max(cosine_similarity(sample.embedding, s.embedding) for s in siblings)

    def is_duplicate(self, separation: float) -> bool:
        if self.distance == "edit":
            return separation < self.threshold
        if self.distance == "cosine":
            return 1.0 - separation >= self.threshold
        return False

    def decide(self, samples: Sequence[OptionSample], siblings: Sequence[OptionSample]) -> MergeDecision:
        """Given the samples drawn so far for one slot (the latest last) and the siblings present now:
        accept the latest, resample, or keep the most distant sample (ties: the earliest)."""
        if not samples:
            raise ValueError("decide() needs at least one sample")
        latest = len(samples) - 1
        if not self.is_duplicate(self.separation(samples[latest], siblings)):
            return MergeDecision("accept", latest)
        if latest < self.max_resample:
            return MergeDecision("resample")
        # Siblings only grow, so every earlier sample is still a duplicate: its capped distance is exact.
        separations = [self.separation(s, siblings) for s in samples]
        return MergeDecision("keep", int(np.argmax(np.asarray(separations, np.float64))))
