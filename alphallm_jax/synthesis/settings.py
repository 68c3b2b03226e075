"""`SynthesisSettings`: how new prompts are sampled and filtered (the `synthesis` config section)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from alphallm_jax.synthesis.form import FormRules

METHODS = ("fewshot", "prefix", "unconditional")


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    """Character-shingle Jaccard thresholds: a candidate at or above one is dropped."""

    shingle_size: int = 5
    num_perm: int = 128  # MinHash signature length (LSH candidates; every match is checked exactly)
    test_threshold: float = 0.85  # against every evaluation split of the task
    d0_threshold: float = 0.9  # against the seed set D0
    synthetic_threshold: float = 0.9  # against prompts kept earlier (this and previous iterations)


RENUMBER_DRAWS = ("d0", "uniform")


@dataclasses.dataclass(frozen=True)
class SynthesisSettings:
    # fewshot (variation of a D0 seed) | prefix (a seed's opening continued) | unconditional, or several
    # joined by commas ("prefix,unconditional"): equal shares of every round's candidates.
    method: str = "fewshot"
    num_prompts: int = 64  # prompts kept per iteration
    num_exemplars: int = 4  # D0 questions shown per few-shot prompt, the seed last
    exemplar_solutions: bool = False  # show the exemplars' D0 solutions too (plain-format models)
    # Text before the exemplars; "{variation}" is replaced by one of `variations`, drawn per prompt.
    instruction: str = ""
    variations: tuple[str, ...] = ("new numbers", "new names and objects", "a different asked quantity")
    unconditional_prefix: str = "Question:"  # what a question-trained model continues into a new question
    prefix_sentences: int = 1  # prefix: the seed's opening sentences the policy continues
    renumber_prefix: bool = True  # prefix: the opening's numbers are drawn anew (the "new numbers" variation)
    # How a number v is drawn anew, always within [v/2, 2v]: "d0", among the numbers D0's questions state,
    # as often as they state them (the task's own magnitudes); "uniform", any integer in the range.
    renumber_draw: str = "d0"
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ("\n",)  # the end of a question
    oversample: float = 2.0  # first round: candidates per prompt still needed (later: 1 / keep rate)
    max_rounds: int = 5
    seed: int = 0
    form: FormRules = FormRules()
    dedup: DedupSettings = DedupSettings()

    def __post_init__(self):
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"synthesis.method={self.method!r}; choose from {METHODS} (or several, comma-joined)")
        if self.num_exemplars < 1:
            raise ValueError("synthesis.num_exemplars must be >= 1 (the seed question itself)")
        if self.renumber_draw not in RENUMBER_DRAWS:
            raise ValueError(f"synthesis.renumber_draw={self.renumber_draw!r}; choose from {RENUMBER_DRAWS}")
        if self.oversample < 1.0 or self.max_rounds < 1:
            raise ValueError("synthesis.oversample must be >= 1 and max_rounds >= 1")

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.method.split(",") if m.strip())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | Any) -> SynthesisSettings:
        """From the `synthesis` config section; keys that select data (splits) are not settings."""
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        for key in ("seed_split", "num_seeds", "test_splits"):
            d.pop(key, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown synthesis keys {sorted(unknown)}")
        d["form"] = FormRules.from_config(d.get("form", {}))
        d["dedup"] = DedupSettings(**dict(d.get("dedup", {})))
        for key in ("variations", "stop"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
