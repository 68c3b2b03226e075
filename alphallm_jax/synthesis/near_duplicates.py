"""Near-duplicate search over question texts: character-shingle Jaccard with a MinHash LSH index.

A question becomes the set of its character n-grams (lower-cased, whitespace collapsed; digits kept, so
the same template with other numbers is a different question) hashed with crc32, which is stable across
processes (Python's `hash` of a str is salted per process and would break reproducibility).

`NearDuplicateIndex.find` returns the first stored text whose exact shingle Jaccard reaches the
threshold. Candidates come from MinHash banding (locality-sensitive hashing): only texts that agree with
the query on a whole band of the signature are compared exactly, so a query costs O(candidates), not
O(index size), and thousands of prompts against thousands of references stay cheap. Banding can miss a
true duplicate with a small probability (the band shape keeps it under 0.1% at the threshold, less above
it: `lsh_band_shape`); it never reports a false one, because every candidate is checked exactly.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

_PRIME = (1 << 31) - 1  # hash values are reduced below it, so a * x + b fits in uint64
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", text.strip().lower())


def shingles(text: str, n: int = 5) -> frozenset[int]:
    """crc32 hashes of the character n-grams of the normalized text (the whole text if shorter)."""
    t = normalize(text)
    if len(t) <= n:
        return frozenset((zlib.crc32(t.encode()),))
    return frozenset(zlib.crc32(t[i:i + n].encode()) for i in range(len(t) - n + 1))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


MAX_MISS_AT_THRESHOLD = 1e-3


def lsh_band_shape(threshold: float, num_perm: int, max_miss: float = MAX_MISS_AT_THRESHOLD) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm: the longest bands (the fewest candidates to compare
    exactly) whose chance of missing a pair at exactly the threshold, (1 - threshold^rows)^bands, is at
    most `max_miss`; a more similar pair is missed less often still. (A shape balancing misses against
    candidates over the whole similarity range missed 13% of the pairs at the threshold: a test question
    with a word dropped passed the test-overlap filter.) Where no shape reaches `max_miss`, the one
    that misses least."""
    def miss(rows: int) -> float:
        return (1.0 - threshold ** rows) ** (num_perm // rows)

    meeting = [rows for rows in range(1, num_perm + 1) if miss(rows) <= max_miss]
    rows = max(meeting) if meeting else min(range(1, num_perm + 1), key=miss)
    return num_perm // rows, rows


class MinHasher:
    """`num_perm` universal hash functions (a * x + b mod p) drawn from a fixed seed."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self._a = rng.integers(1, _PRIME, size=(num_perm, 1), dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=(num_perm, 1), dtype=np.uint64)

    def signature(self, shingle_set: frozenset[int]) -> np.ndarray:
        x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)) % np.uint64(_PRIME)
        return ((self._a * x[None, :] + self._b) % np.uint64(_PRIME)).min(axis=1)


class NearDuplicateIndex:
    """Texts indexed for "is there a stored text with shingle Jaccard >= threshold?" queries."""

    def __init__(self, threshold: float, *, shingle_size: int = 5, num_perm: int = 128, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.hasher = MinHasher(num_perm, seed)
        self.bands, self.rows = lsh_band_shape(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self._exact: dict[str, int] = {}  # normalized text -> first key
        self._shingles: list[frozenset[int]] = []
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        r = self.rows
        return [signature[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def add(self, key: str, text: str) -> None:
        idx = len(self.keys)
        sh = shingles(text, self.shingle_size)
        self.keys.append(key)
        self._shingles.append(sh)
        self._exact.setdefault(normalize(text), idx)
        for bucket, band in zip(self._buckets, self._band_keys(self.hasher.signature(sh))):
            bucket[band].append(idx)

    def add_many(self, items: Iterable[tuple[str, str]]) -> None:
        for key, text in items:
            self.add(key, text)

    def find(self, text: str) -> tuple[str, float] | None:
        """(key, Jaccard) of the most similar stored text at or above the threshold, else None."""
        exact = self._exact.get(normalize(text))
        if exact is not None:
            return self.keys[exact], 1.0
        if not self.keys:
            return None
        sh = shingles(text, self.shingle_size)
        candidates: set[int] = set()
        for bucket, band in zip(self._buckets, self._band_keys(self.hasher.signature(sh))):
            candidates.update(bucket.get(band, ()))
        best: tuple[str, float] | None = None
        for idx in sorted(candidates):
            sim = jaccard(sh, self._shingles[idx])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (self.keys[idx], sim)
        return best
