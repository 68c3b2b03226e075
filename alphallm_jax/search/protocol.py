"""The interface between the host-side search and whatever samples options and scores states.

The driver batches: every round it makes at most one call of each kind, holding the requests of every
active tree. A backend (the LM sampler plus the critics, or a synthetic environment in tests) implements

    start(requests: Sequence[RootRequest]) -> list[handle]           # one state per new tree's prompt
    expand(requests: Sequence[ExpandRequest]) -> list[ExpandResult]  # one sampled option per request
    evaluate(requests: Sequence[EvaluateRequest]) -> list[NodeScores]  # critics (+ fast rollouts)
    release(handles: Sequence[handle]) -> None                       # states the search no longer needs

Results come back in request order. A handle is opaque to the search: the backend returns one with
every sampled option (e.g. the sampler's state after it, so a child's KV cache starts as its parent's)
and receives the parent's handle back in each `ExpandRequest`. Requests also carry the token ids and
texts of the whole path, so a backend that dropped a state can rebuild it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

OPTION = "option"  # sample one option (or, with to_end, everything to the end of the solution)
COMPLETE = "complete"  # finish the chosen greedy-Q path after the search (always to_end)


@dataclasses.dataclass(frozen=True)
class RootRequest:
    tree: int  # the tree's index in this search run (stable while it runs)
    problem_id: str
    prompt: str
    seed: int


@dataclasses.dataclass(frozen=True)
class ExpandRequest:
    """Sample one continuation of the state after node `parent_id`."""

    tree: int
    problem_id: str
    parent_id: int
    parent_handle: Any  # the backend's state after the parent (from start() or an ExpandResult)
    prompt: str
    path_options: tuple[str, ...]  # option texts root->parent (the root's empty option excluded)
    path_token_ids: tuple[tuple[int, ...], ...]  # their token ids
    depth: int  # depth of the node this sample would become
    to_end: bool  # roll out to the end of the solution instead of stopping after one option
    seed: int  # derived from the tree seed, the parent, the slot and the attempt: batching-independent
    attempt: int = 0  # 0: the slot's first sample; k: the k-th resample after near-duplicates
    want_embedding: bool = False  # cosine state merging reads ExpandResult.embedding
    kind: str = OPTION


@dataclasses.dataclass
class ExpandResult:
    text: str  # the option, with its trailing newline when it ended at one
    token_ids: Sequence[int]
    logprob: float  # sum of the option's token log-probabilities under the policy
    finish_reason: str  # "stop" | "eos" | "length"
    # The solution ends here: a final answer, EOS, or no room left to continue. The driver also ends
    # every node at max_depth and every to_end sample.
    is_final: bool
    answer: str | None = None  # the extracted final answer when there is one
    handle: Any = None  # the state after this option, passed back as the parent_handle of its children
    embedding: np.ndarray | None = None  # required when the request asked want_embedding
    generated_tokens: int | None = None  # tokens sampled for this result; default len(token_ids)


@dataclasses.dataclass(frozen=True)
class EvaluateRequest:
    """Score one state (the root, a new node, or a finished greedy path)."""

    tree: int
    problem_id: str
    node_id: int
    handle: Any  # the backend's state after the node
    prompt: str
    path_options: tuple[str, ...]  # option texts root->node
    path_token_ids: tuple[tuple[int, ...], ...]
    terminal: bool  # a complete solution: the ORM scores it directly
    want_value: bool
    want_prm: bool
    want_orm: bool  # ORM of this (terminal) state
    num_rollouts: int  # fast rollouts to the end, each scored by the ORM; 0: none
    seed: int


@dataclasses.dataclass
class NodeScores:
    value: float | None = None
    prm: float | None = None
    orm: float | None = None
    rollout_orm: float | None = None  # mean ORM over the rollouts
    rollout_tokens: int = 0  # tokens the rollouts sampled
    # Each rollout as {"text": the solution's text after the node, "answer": its final answer or None,
    # "orm": its (tool-checked) ORM}: complete solutions the search paid for, which answer selection can count.
    rollouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class SearchBackend(Protocol):
    def start(self, requests: Sequence[RootRequest]) -> list[Any]: ...

    def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]: ...

    def evaluate(self, requests: Sequence[EvaluateRequest]) -> list[NodeScores]: ...

    def release(self, handles: Sequence[Any]) -> None: ...
