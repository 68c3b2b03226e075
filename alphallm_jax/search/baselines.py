"""Step-level beam search guided by a critic, over the same backend protocol as eta-MCTS.

Per step, every beam state is expanded `expansions_per_beam` times; the new states are scored (PRM of
the newest step, the lowest PRM along the path, or the value head) and the best `beam_width` unfinished
ones form the next beam. Complete solutions are set aside; the search stops with `beam_width` of them,
an empty beam, or `max_nodes` options sampled. The answer is the best complete solution by the guide
score (or by the ORM). All problems advance in lockstep: one expand and one evaluate call per step.
Self-consistency and ORM best-of-N are plain sampling and live in the evaluation harness.

Results are `Tree`s (the beam's expansions as nodes, the guide score as each node's reward, N and W
zero), so beam searches are written, loaded and viewed like MCTS trees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from alphallm_jax.search.protocol import (
    COMPLETE,
    OPTION,
    EvaluateRequest,
    ExpandRequest,
    RootRequest,
    SearchBackend,
)
from alphallm_jax.search.tree import FINISH_REASONS, Node, SearchProblem, Tree, derive_seed, finite_or_none

GUIDES = ("prm", "prm_min", "value")
FINAL_SELECTIONS = ("guide", "orm")
_ROOT_STREAM, _EXPAND_STREAM, _EVALUATE_STREAM = 10, 11, 12


@dataclasses.dataclass(frozen=True)
class BeamSearchConfig:
    beam_width: int = 4
    expansions_per_beam: int = 4  # options sampled from each beam state per step
    max_depth: int = 10  # options at this depth are rolled out to the end, as in eta-MCTS
    guide: str = "prm"  # prm: the newest step's PRM | prm_min: the lowest PRM on the path | value
    final_selection: str = "guide"  # guide: the best finished solution by the guide | orm: by the ORM
    max_nodes: int = 0  # options sampled per problem (a completion may add one); 0: no cap

    def __post_init__(self) -> None:
        if self.guide not in GUIDES:
            raise ValueError(f"BeamSearchConfig.guide={self.guide!r}; choose from {GUIDES}")
        if self.final_selection not in FINAL_SELECTIONS:
            raise ValueError(f"BeamSearchConfig.final_selection={self.final_selection!r}; choose from {FINAL_SELECTIONS}")
        if min(self.beam_width, self.expansions_per_beam, self.max_depth) < 1 or self.max_nodes < 0:
            raise ValueError("beam_width, expansions_per_beam and max_depth must be >= 1, max_nodes >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> BeamSearchConfig:
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BeamSearchConfig fields: {sorted(unknown)}")
        return cls(**d)


class _Beam:
    def __init__(self, index: int, problem: SearchProblem, config: BeamSearchConfig):
        self.index = index
        self.config = config
        self.tree = Tree(problem=problem, config={"method": "beam", **config.to_dict()})
        self.beam: list[int] = [0]
        self.finished: list[int] = []
        self.sampled = 0  # options sampled (the budget)
        self.done = False

    def _path(self, node_id: int) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        nodes = self.tree.options_to(node_id)
        return tuple(n.option for n in nodes), tuple(tuple(n.option_token_ids) for n in nodes)

    def _expand_request(self, parent: Node, slot: int, kind: str) -> ExpandRequest:
        options, token_ids = self._path(parent.id)
        depth = parent.depth + 1
        return ExpandRequest(
            tree=self.index, problem_id=self.tree.problem.problem_id, parent_id=parent.id,
            parent_handle=parent.handle, prompt=self.tree.problem.prompt, path_options=options,
            path_token_ids=token_ids, depth=depth, to_end=kind == COMPLETE or depth >= self.config.max_depth,
            seed=derive_seed(self.tree.problem.seed, _EXPAND_STREAM, parent.id, slot), kind=kind,
        )

    def expansion_requests(self) -> list[tuple[ExpandRequest, str]]:
        """This step's expansions, best beam state first, within the node budget; or a completion of the
        best unfinished state when the budget ran out with nothing finished."""
        c = self.config
        room = c.max_nodes - self.sampled if c.max_nodes else len(self.beam) * c.expansions_per_beam
        if len(self.finished) >= c.beam_width or not self.beam or room <= 0:
            if not self.finished and self.beam:
                return [(self._expand_request(self.tree.nodes[self.beam[0]], 0, COMPLETE), COMPLETE)]
            self._finish()
            return []
        requests = []
        for node_id in self.beam:
            for j in range(c.expansions_per_beam):
                if len(requests) < room:
                    requests.append((self._expand_request(self.tree.nodes[node_id], j, OPTION), OPTION))
        return requests

    def add(self, request: ExpandRequest, result, kind: str) -> EvaluateRequest:
        if result.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {result.finish_reason!r} is not one of {FINISH_REASONS}")
        self.sampled += 1
        self.tree.generated_tokens += (result.generated_tokens if result.generated_tokens is not None
                                       else len(result.token_ids))
        node = self.tree.add_child(
            request.parent_id, option=result.text, option_token_ids=[int(t) for t in result.token_ids],
            option_logprob=float(result.logprob), terminal=result.is_final or request.to_end,
            answer=result.answer, finish_reason=result.finish_reason, completion=kind == COMPLETE,
            handle=result.handle,
        )
        options, token_ids = self._path(node.id)
        return EvaluateRequest(
            tree=self.index, problem_id=self.tree.problem.problem_id, node_id=node.id, handle=node.handle,
            prompt=self.tree.problem.prompt, path_options=options, path_token_ids=token_ids,
            terminal=node.terminal, want_value=self.config.guide == "value",
            want_prm=self.config.guide != "value", want_orm=node.terminal and self.config.final_selection == "orm",
            num_rollouts=0, seed=derive_seed(self.tree.problem.seed, _EVALUATE_STREAM, node.id),
        )

    def score(self, node_id: int, scores) -> None:
        node = self.tree.nodes[node_id]
        for name in ("value", "prm", "orm"):
            setattr(node, name, finite_or_none(getattr(scores, name), f"{name} of node {node_id}"))
        self.tree.generated_tokens += int(scores.rollout_tokens)
        node.reward = self._guide(node)

    def _guide(self, node: Node) -> float:
        name = "value" if self.config.guide == "value" else "prm"
        if getattr(node, name) is None:
            raise ValueError(f"the backend gave no {name} score for node {node.id} (the beam's guide)")
        if self.config.guide == "prm_min":
            return min(n.prm for n in self.tree.options_to(node.id))
        return float(getattr(node, name))

    def next_beam(self, new_nodes: list[int]) -> None:
        """Set finished solutions aside; keep the best `beam_width` unfinished states (ties: lower id)."""
        unfinished = []
        for node_id in new_nodes:
            (self.finished if self.tree.nodes[node_id].terminal else unfinished).append(node_id)
        ranked = sorted(unfinished, key=lambda i: (-self.tree.nodes[i].reward, i))
        self.beam = ranked[: self.config.beam_width]

    def _final_key(self, node_id: int) -> tuple[float, int]:
        node = self.tree.nodes[node_id]
        score = node.orm if self.config.final_selection == "orm" else node.reward
        return (score if score is not None else float("-inf"), -node_id)

    def _finish(self) -> None:
        if self.finished:
            best = max(self.finished, key=self._final_key)
            self.tree.chosen_path = self.tree.path_to(best)
            self.tree.answer = self.tree.nodes[best].answer
        self.tree.answer_method = f"beam_{self.config.guide}"
        self.tree.extra.update(nodes_sampled=self.sampled)
        self.done = True

    def take_handles(self) -> list[Any]:
        handles = [n.handle for n in self.tree.nodes if n.handle is not None]
        for n in self.tree.nodes:
            n.handle = None
        return handles


def beam_search(problems: Sequence[SearchProblem], backend: SearchBackend, config: BeamSearchConfig) -> list[Tree]:
    """Step-level beam search over every problem in lockstep; one tree per problem, in order."""
    beams = [_Beam(i, p, config) for i, p in enumerate(problems)]
    if beams:
        roots = backend.start([RootRequest(b.index, b.tree.problem.problem_id, b.tree.problem.prompt,
                                           derive_seed(b.tree.problem.seed, _ROOT_STREAM)) for b in beams])
        for b, handle in zip(beams, roots):
            b.tree.root.handle = handle
    active = beams
    while active:
        expansions = [(b, req, kind) for b in active for req, kind in b.expansion_requests()]
        released = []
        if expansions:
            results = backend.expand([req for _, req, _ in expansions])
            evaluations = [(b, b.add(req, res, kind)) for (b, req, kind), res in zip(expansions, results)]
            scores = backend.evaluate([req for _, req in evaluations])
            new_nodes: dict[int, list[int]] = {}
            for (b, req), s in zip(evaluations, scores):
                b.score(req.node_id, s)
                new_nodes.setdefault(b.index, []).append(req.node_id)
            for b in active:
                if b.index in new_nodes:
                    b.next_beam(new_nodes[b.index])
        for b in active:
            if b.done:
                released.extend(b.take_handles())
        if released:
            backend.release(released)
        active = [b for b in active if not b.done]
    return [b.tree for b in beams]
