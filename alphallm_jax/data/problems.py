"""The problem record shared by every loader, the reference task and the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["gsm8k", "math", "arith"]
TASKS: tuple[str, ...] = ("gsm8k", "math", "arith")


@dataclass(frozen=True)
class Problem:
    """One labelled (or, for synthesized prompts, unlabelled) problem.

    Attributes:
      id: stable identifier, e.g. ``gsm8k-test-00012`` (split name and 0-based line
        index in the source file) or ``arith-train-00007``.
      question: the problem text shown to the policy.
      answer: the normalized final answer (GSM8K/arith: a number without commas, e.g.
        ``"1200"``; MATH: the LaTeX of the final answer, e.g. ``"\\frac{1}{2}"``). Empty
        for synthesized prompts, which are never graded against a reference.
      solution: the reference solution text, or ``None`` when the source has none.
      task: ``"gsm8k"``, ``"math"`` or ``"arith"`` (selects grading and prompt format).
      meta: source-specific extras (``split``, ``line``, ``level``, ``subject``,
        ``source`` path ...). Treat as read-only; it is left out of hashing.
    """

    id: str
    question: str
    answer: str
    solution: str | None
    task: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Problem {self.id!r}: unknown task {self.task!r}; expected one of {TASKS}")
        if not isinstance(self.question, str) or not isinstance(self.answer, str):
            raise TypeError(f"Problem {self.id!r}: question and answer must be str")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "solution": self.solution,
            "task": self.task,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Problem:
        return cls(
            id=str(d["id"]),
            question=d["question"],
            answer=d["answer"],
            solution=d.get("solution"),
            task=d["task"],
            meta=dict(d.get("meta") or {}),
        )
