"""A synthetic search backend with a known best path: tests and demos of the search without a model.

Each option picks one of a few "arms" (a step that is good, fair or poor), sampled from a fixed policy
that prefers the worse arms, so finding the good path takes search. A solution has `solution_steps`
options; its answer spells the arms taken (``"ggg"`` is the best). The critics are exact and
deterministic: v(s) is the mean quality of the arms so far, PRM(s) the quality of the last arm, the ORM
of a complete solution the mean quality of all its arms, and fast rollouts complete the solution with
arms drawn from the policy. Every sample depends only on its request's seed.

Options of one arm differ only in a two-digit tag, so same-arm siblings are near-duplicates (edit
distance <= 2) while different arms are far apart: state merging has something to do.
The backend records every call and checks that each request's parent handle matches its path.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from alphallm_jax.search.protocol import (
    EvaluateRequest,
    ExpandRequest,
    ExpandResult,
    NodeScores,
    RootRequest,
)

ARM_PHRASES = {
    "g": "carefully multiply the totals together",
    "f": "add up the two parts roughly",
    "p": "guess a number from the question",
}


@dataclasses.dataclass(frozen=True)
class SyntheticState:
    """The handle: which arms the path took (and a unique id, to check that states are released)."""

    uid: int
    problem_id: str
    arms: tuple[str, ...]


@dataclasses.dataclass
class SyntheticBackend:
    arm_quality: dict[str, float] = dataclasses.field(default_factory=lambda: {"g": 0.9, "f": 0.5, "p": 0.1})
    arm_probs: dict[str, float] = dataclasses.field(default_factory=lambda: {"g": 0.2, "f": 0.4, "p": 0.4})
    solution_steps: int = 3
    root_value: float = 0.5
    embedding_noise: float = 0.05

    def __post_init__(self) -> None:
        self.arm_names = tuple(self.arm_quality)
        probs = np.array([self.arm_probs[a] for a in self.arm_names], np.float64)
        self._probs = probs / probs.sum()
        self._uids = itertools.count()
        self.live: dict[int, SyntheticState] = {}  # handles handed out and not released
        self.calls: list[tuple[str, list, list]] = []  # (kind, requests, results) in call order

    # ----- the protocol ------------------------------------------------------------------------------
    def start(self, requests: Sequence[RootRequest]) -> list[SyntheticState]:
        return self._record("start", requests, [self._new_state(r.problem_id, ()) for r in requests])

    def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        return self._record("expand", requests, [self._expand_one(r) for r in requests])

    def evaluate(self, requests: Sequence[EvaluateRequest]) -> list[NodeScores]:
        return self._record("evaluate", requests, [self._evaluate_one(r) for r in requests])

    def release(self, handles: Sequence[SyntheticState]) -> None:
        self._record("release", handles, [])
        for h in handles:
            if h.uid not in self.live:
                raise ValueError(f"released an unknown or already released state {h}")
            del self.live[h.uid]

    # ----- the environment ---------------------------------------------------------------------------
    def option_text(self, depth: int, arm: str, tag: int) -> str:
        return f"Step {depth}: {ARM_PHRASES[arm]} ({tag:02d}).\n"

    def answer_of(self, arms: Sequence[str]) -> str:
        return "".join(arms)

    def quality(self, arms: Sequence[str]) -> float:
        return float(np.mean([self.arm_quality[a] for a in arms])) if arms else self.root_value

    def _new_state(self, problem_id: str, arms: tuple[str, ...]) -> SyntheticState:
        state = SyntheticState(next(self._uids), problem_id, arms)
        self.live[state.uid] = state
        return state

    def _arms_of_path(self, options: Sequence[str]) -> tuple[str, ...]:
        phrase_to_arm = {p: a for a, p in ARM_PHRASES.items()}
        arms = []
        for option in options:
            for line in option.splitlines():
                if line.startswith("Step "):
                    arms.append(phrase_to_arm[line.split(": ", 1)[1].rsplit(" (", 1)[0]])
        return tuple(arms)

    def _check_handle(self, handle: SyntheticState, problem_id: str, options: Sequence[str]) -> None:
        if handle is None or handle.uid not in self.live:
            raise ValueError(f"request for {problem_id!r} carries a missing or released state {handle}")
        if handle.problem_id != problem_id or handle.arms != self._arms_of_path(options):
            raise ValueError(f"state {handle} does not match the request's path {list(options)}")

    def _draw_arms(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.arm_names[i] for i in rng.choice(len(self.arm_names), size=n, p=self._probs)]

    def _expand_one(self, r: ExpandRequest) -> ExpandResult:
        self._check_handle(r.parent_handle, r.problem_id, r.path_options)
        rng = np.random.default_rng(r.seed)
        have = len(r.parent_handle.arms)
        steps = max(1, self.solution_steps - have) if r.to_end else 1
        arms = self._draw_arms(rng, steps)
        tags = rng.integers(0, 100, size=steps)
        text = "".join(self.option_text(have + 1 + i, a, int(t)) for i, (a, t) in enumerate(zip(arms, tags)))
        all_arms = r.parent_handle.arms + tuple(arms)
        final = len(all_arms) >= self.solution_steps
        answer = self.answer_of(all_arms) if final else None
        if final:
            text += f"#### {answer}\n"
        token_ids = [ord(ch) for ch in text]
        logprob = float(sum(math.log(self.arm_probs[a]) for a in arms))
        embedding = None
        if r.want_embedding:
            one_hot = np.array([float(a == arms[-1]) for a in self.arm_names])
            embedding = one_hot + self.embedding_noise * rng.standard_normal(len(self.arm_names))
        return ExpandResult(
            text=text, token_ids=token_ids, logprob=logprob, finish_reason="eos" if final else "stop",
            is_final=final, answer=answer, handle=self._new_state(r.problem_id, all_arms), embedding=embedding,
        )

    def _evaluate_one(self, r: EvaluateRequest) -> NodeScores:
        self._check_handle(r.handle, r.problem_id, r.path_options)
        arms = r.handle.arms
        scores = NodeScores()
        if r.want_value:
            scores.value = self.quality(arms)
        if r.want_prm and arms:
            scores.prm = self.arm_quality[arms[-1]]
        if r.want_orm:
            scores.orm = self.quality(arms)
        if r.num_rollouts:
            outcomes, tokens = [], 0
            for k in range(r.num_rollouts):
                rng = np.random.default_rng([r.seed, k])
                rest = self._draw_arms(rng, max(0, self.solution_steps - len(arms)))
                outcomes.append(self.quality(arms + tuple(rest)))
                tokens += sum(len(self.option_text(0, a, 0)) for a in rest)
            scores.rollout_orm = float(np.mean(outcomes))
            scores.rollout_tokens = tokens
        return scores

    def _record(self, kind: str, requests: Sequence, results: list) -> list:
        self.calls.append((kind, list(requests), results))
        return results

    def calls_of(self, kind: str) -> list[list]:
        """The requests of every call of one kind, in call order."""
        return [requests for k, requests, _ in self.calls if k == kind]

    def exchanges(self, kind: str) -> list[tuple]:
        """(request, result) of every request of one kind, in call order."""
        return [pair for k, requests, results in self.calls if k == kind for pair in zip(requests, results)]
