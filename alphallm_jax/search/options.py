"""Options as text: where a sampled option (or a rollout to the end) stops and whether it ends the solution.

An option is one reasoning step: the text up to and including the step separator (`"\\n"`, or `"\\n\\n"`
for paragraph steps). It ends early at EOS, at the token cap, or at the final answer. The final answer is
the line holding `#### N` (GSM8K/arith) or a complete `\\boxed{...}` (MATH); the whole line is kept (a
`#### 4` cut by the token cap is not final yet: the next option finishes the number). Text that starts a
new problem after a solution (an end stop such as `"\\nQuestion:"`) is cut off, and so is anything after
the final answer's line. These rules work on the whole solution text so far, so a final line split over
two options is still found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from alphallm_jax.data.grading import canonical_answer, extract_answer
from alphallm_jax.data.prompts import step_separator

_HASH_LINE_RE = re.compile(r"####[ \t]*\S[^\n]*")
_BOX_START_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# MATH rule-based extension: a step "has an equation" when it relates two expressions.
_EQUATION_RE = re.compile(r"=|\\le\b|\\ge\b|\\leq\b|\\geq\b|\\neq\b|\\approx\b|<|>")


@dataclasses.dataclass(frozen=True)
class OptionConfig:
    """How options and rollouts are sampled and cut (the `search.options` config section)."""

    separator: str = ""  # the step terminator; "": the task's (`\n`, `\n\n` for MATH)
    max_option_tokens: int = 64  # the token cap of one option
    max_solution_tokens: int = 256  # the token cap of a whole solution (options, to_end samples, rollouts)
    # Text that ends a solution without a final answer (a new problem starting); cut off where it starts.
    # With one step per line (separator "\n") a blank line also ends the solution.
    solution_stops: tuple[str, ...] = ("\nQuestion:",)
    temperature: float = 1.0  # option sampling
    top_p: float = 1.0
    top_k: int = 0
    rollout_temperature: float = 1.0  # fast rollouts to the end
    rollout_top_p: float = 1.0
    rollout_top_k: int = 0
    math_extension: bool = True  # MATH: an option with no equation gets one more step appended

    def __post_init__(self) -> None:
        if self.max_option_tokens < 1 or self.max_solution_tokens < 1:
            raise ValueError("max_option_tokens and max_solution_tokens must be >= 1")
        if any(not s for s in self.solution_stops):
            raise ValueError("solution_stops must be non-empty strings")
        for name in ("temperature", "rollout_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptionConfig.{name} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "solution_stops": list(self.solution_stops)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> OptionConfig:
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown OptionConfig fields: {sorted(unknown)}")
        if "solution_stops" in d:
            d["solution_stops"] = tuple(d["solution_stops"])
        return cls(**d)

    def separator_for(self, task: str) -> str:
        return self.separator or step_separator(task)

    def end_stops(self, task: str) -> tuple[str, ...]:
        """Stop strings that end the whole solution (never the step separator itself)."""
        return solution_end_stops(self.solution_stops, self.separator_for(task))


def solution_end_stops(solution_stops: Sequence[str], separator: str) -> tuple[str, ...]:
    """The stop strings that end a whole solution whose steps end at `separator`: `solution_stops`
    without the separator itself (MATH's paragraphs end at the blank line that would otherwise end
    a solution), plus the blank line when steps are lines."""
    stops = [s for s in solution_stops if s != separator]
    if separator == "\n" and "\n\n" not in stops:
        stops.append("\n\n")  # one step per line: a blank line closes the solution
    return tuple(stops)


def final_answer_end(text: str, task: str, *, complete: bool) -> int | None:
    """The index just past the line that holds the first final answer in `text`, or None when there is none.

    A final answer on the unfinished last line counts only when `complete` (the sample ended by EOS or
    a stop string, not by the token cap, so the answer cannot be cut short)."""
    if task == "math":
        end = _first_boxed_end(text)
    else:
        m = _HASH_LINE_RE.search(text)
        end = m.end() if m else None
    if end is None:
        return None
    newline = text.find("\n", end)
    if newline >= 0:
        return newline + 1
    return len(text) if complete else None


def _first_boxed_end(text: str) -> int | None:
    """The index just past the first complete `\\boxed{...}` (braces balanced)."""
    for m in _BOX_START_RE.finditer(text):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return i + 1
    return None


def has_equation(text: str) -> bool:
    return _EQUATION_RE.search(text) is not None


@dataclasses.dataclass(frozen=True)
class OptionEnd:
    keep_chars: int  # characters of the sample to keep (the rest is cut off)
    ends_solution: bool  # the solution is complete after the kept text


def option_end(prefix: str, sample: str, *, task: str, finish_reason: str, stop_string: str | None,
               end_stops: Sequence[str]) -> OptionEnd:
    """Where a sample continuing the solution text `prefix` ends, and whether it completes the solution.

    In order: the final answer's line (everything after it is cut) unless an end stop comes first, an end
    stop (cut where it starts, keeping a leading newline so the last step keeps its terminator), a blank
    step (the model closed the solution with an empty line), EOS. Otherwise the sample is an ordinary step
    (or was cut by the cap). An end stop may begin in `prefix`: a step ends in its newline, so a sample
    that opens a new question (`Question:` after the last step's `\n`) ends the solution where it begins,
    and an answer written after it is not this solution's (the sampler stops there too when the request
    names the end stops in `context_stops`)."""
    stop_keep = _end_stop_keep(prefix, sample, end_stops)
    considered = sample if stop_keep is None else sample[:stop_keep]
    complete = finish_reason != "length" or stop_keep is not None
    answer_end = final_answer_end(prefix + considered, task, complete=complete)
    if answer_end is not None:
        return OptionEnd(max(0, min(len(considered), answer_end - len(prefix))), True)
    if stop_keep is not None:
        return OptionEnd(stop_keep, True)
    if finish_reason == "stop" and not sample.strip():
        return OptionEnd(len(sample), True)
    return OptionEnd(len(sample), finish_reason == "eos")


def _end_stop_keep(prefix: str, sample: str, end_stops: Sequence[str]) -> int | None:
    """Characters of `sample` kept before the earliest end stop, or None: a stop inside the sample keeps
    its leading newline; one that begins in `prefix` (its newline, say, ends the last step) keeps
    nothing. A stop whose part in the sample is only whitespace (the second newline of a blank line) is
    left to the blank-step and answer rules, as a stop inside the sample would be."""
    found = []
    for stop in end_stops:
        at = sample.find(stop)
        if at >= 0:
            found.append((at, stop))
        tail = prefix[len(prefix) - len(stop) + 1:] if len(stop) > 1 else ""
        at = (tail + sample).find(stop) if tail else -1
        if 0 <= at < len(tail) and stop[len(tail) - at:].strip():
            found.append((at - len(tail), stop))
    if not found:
        return None
    at, stop = min(found)
    return max(0, at + (1 if stop.startswith("\n") else 0))


def solution_answer(text: str, task: str) -> str | None:
    """The canonical final answer of a solution text (the grader's extraction), or None."""
    return canonical_answer(extract_answer(text, task), task)
