"""Lockstep batched eta-MCTS over many trees at once.

Every round:
  1. trees that join the search get their root states in one `start` call;
  2. each active tree selects up to `leaves_per_tree_per_round` leaves to expand (virtual loss spreads
     them); slots whose last sample was a near-duplicate ask for a resample; finished trees whose
     greedy-Q path stops short ask for its completion. All of it goes out in one `expand` call;
  3. each sample is checked against its siblings (state merging): accepted samples become nodes, the
     others wait for next round's resample;
  4. all new nodes (and new roots) are scored in one `evaluate` call: r(s) = beta_v * v + beta_prm *
     PRM + beta_orm * mean ORM(rollouts), or the ORM alone for a terminal node; each reward is
     backpropagated (N += 1, W += r on the node and every ancestor);
  5. states no longer needed go back in one `release` call.
A selection that reaches a terminal node backpropagates its reward again at once, with no device work.
While the tree has expansions in flight, a round makes at most `leaves_per_tree_per_round` such revisits
(then it stops selecting): sequential MCTS would have had those expansions' results before selecting
again, so a round must not spend the budget on revisits steered by their virtual loss.

A tree stops selecting once it has `num_simulations` iterations and `min_terminals` terminal nodes
(or `hard_cap_factor * num_simulations` iterations, or nothing left to expand) and then picks its
answer. Each tree's draws depend only on its own seed, never on which trees share its batches: searching
problems together or one at a time gives the same trees (with a language model, up to the last bits of
its floats, which depend on the batch's shapes and can move a draw that falls near a boundary).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from alphallm_jax.search import expansion, selection
from alphallm_jax.search.answers import choose_answer
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.merging import MergePolicy, OptionSample
from alphallm_jax.search.protocol import (
    COMPLETE,
    OPTION,
    EvaluateRequest,
    ExpandRequest,
    ExpandResult,
    NodeScores,
    RootRequest,
    SearchBackend,
)
from alphallm_jax.search.tree import FINISH_REASONS, Node, SearchProblem, Tree, derive_seed, finite_or_none

log = logging.getLogger(__name__)

CALL_KINDS = ("start", "expand", "evaluate", "release")
# Seed streams: each kind of randomness draws from its own stream of the tree seed.
_ROOT_STREAM, _EXPAND_STREAM, _EVALUATE_STREAM, _COMPLETE_STREAM = range(4)

SEARCHING, COMPLETING, DONE = "searching", "completing", "done"


@dataclasses.dataclass
class SearchStats:
    """What the driver sent to the backend: calls and requests per kind, and every batch's size."""

    rounds: int = 0
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(CALL_KINDS, 0))
    requests: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(CALL_KINDS, 0))
    batch_sizes: dict[str, list[int]] = dataclasses.field(default_factory=lambda: {k: [] for k in CALL_KINDS})

    def record(self, kind: str, n: int) -> None:
        self.calls[kind] += 1
        self.requests[kind] += n
        self.batch_sizes[kind].append(n)

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "calls": dict(self.calls), "requests": dict(self.requests)}


@dataclasses.dataclass(eq=False)
class _Slot:
    """One expansion in flight: a new child of `parent_id`, or the completion of the greedy path."""

    parent_id: int
    path: list[int]  # root..parent: the nodes carrying this slot's virtual loss (none for completions)
    index: int  # the parent's slot counter: with the attempt number it seeds the samples
    kind: str = OPTION
    samples: list[ExpandResult] = dataclasses.field(default_factory=list)
    node_id: int | None = None  # the node it became, once a sample was accepted


class _TreeSearch:
    """The search state of one tree: its selections, slots in flight and budget."""

    def __init__(self, index: int, problem: SearchProblem, config: MCTSConfig):
        self.index = index
        self.config = config
        self.tree = Tree(problem=problem, config=config.to_dict())
        self.merge = MergePolicy.from_config(config)
        self.phase = SEARCHING
        self.slots: list[_Slot] = []  # in flight: awaiting a sample or a resample
        self.embeddings: dict[int, Any] = {}  # node id -> option embedding (cosine merging)
        self.terminal_count = 0
        self.option_samples = 0  # every option sampled, rejected near-duplicates included
        self.rounds = 0

    # ----- selection -------------------------------------------------------------------------------
    def expansion_requests(self) -> list[tuple[_Slot, ExpandRequest]]:
        """This round's expansions: resamples carried over, then new selections (or the completion)."""
        self.rounds += 1
        if self.phase == SEARCHING:
            exhausted = self._select_leaves()
            if not self.slots and (exhausted or not self._may_select()):
                self._finish_search()
        return [(slot, self._expand_request(slot)) for slot in self.slots if slot.node_id is None]

    def _may_select(self) -> bool:
        c = self.config
        started = self.tree.simulations + len(self.slots)  # in-flight slots will each be an iteration
        if started >= c.max_simulations:
            return False
        return not (started >= c.num_simulations and self.terminal_count >= c.min_terminals)

    def _select_leaves(self) -> bool:
        """Fill the round's k slots (resamples carried over count); a terminal reached is revisited at
        once and takes no slot, but at most k times per round while slots are in flight (a later one
        waits for their results). True when nothing is left to select."""
        k = self.config.leaves_per_tree_per_round
        blocked: set[int] = set()
        revisits_in_flight = 0  # revisits steered by in-flight slots' virtual loss (and blocked paths)
        while len(self.slots) < k and self._may_select():
            path = self._select_leaf(blocked)
            if path is None:
                return True
            leaf = self.tree.nodes[path[-1]]
            if leaf.terminal:
                if self.slots:
                    if revisits_in_flight == k:
                        return False  # not exhausted: the next round selects after their results
                    revisits_in_flight += 1
                self.tree.backpropagate(leaf.id, self._reward_of(leaf))
                self.tree.simulations += 1
                continue
            for i in path:
                self.tree.nodes[i].virtual_loss += 1
            leaf.pending_children += 1
            self.slots.append(_Slot(parent_id=leaf.id, path=path, index=leaf.expansions_requested))
            leaf.expansions_requested += 1
        return False

    def _select_leaf(self, blocked: set[int]) -> list[int] | None:
        """The path root->node of the next node to expand or terminal node to revisit; None if none."""
        tree, config = self.tree, self.config
        while True:
            path = [0]
            node = tree.root
            while True:
                if node.terminal or expansion.wants_child(tree, node, config):
                    return path
                child = selection.select_child(tree, node, config, excluded=blocked)
                if child is None:
                    if node.id == 0:
                        return None
                    blocked.add(node.id)  # every way down is taken by slots in flight: try elsewhere
                    break
                node = tree.nodes[child]
                path.append(child)

    # ----- requests ----------------------------------------------------------------------------------
    def _path(self, node_id: int) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        nodes = self.tree.options_to(node_id)
        return tuple(n.option for n in nodes), tuple(tuple(n.option_token_ids) for n in nodes)

    def root_request(self) -> RootRequest:
        p = self.tree.problem
        return RootRequest(tree=self.index, problem_id=p.problem_id, prompt=p.prompt,
                           seed=derive_seed(p.seed, _ROOT_STREAM))

    def _expand_request(self, slot: _Slot) -> ExpandRequest:
        parent = self.tree.nodes[slot.parent_id]
        options, token_ids = self._path(parent.id)
        depth = parent.depth + 1
        attempt = len(slot.samples)
        if slot.kind == COMPLETE:
            seed = derive_seed(self.tree.problem.seed, _COMPLETE_STREAM, parent.id)
        else:
            seed = derive_seed(self.tree.problem.seed, _EXPAND_STREAM, parent.id, slot.index, attempt)
        return ExpandRequest(
            tree=self.index, problem_id=self.tree.problem.problem_id, parent_id=parent.id,
            parent_handle=parent.handle, prompt=self.tree.problem.prompt, path_options=options,
            path_token_ids=token_ids, depth=depth, to_end=slot.kind == COMPLETE or depth >= self.config.max_depth,
            seed=seed, attempt=attempt, want_embedding=self.config.merge_distance == "cosine", kind=slot.kind,
        )

    def evaluate_request(self, node: Node) -> EvaluateRequest:
        c = self.config
        options, token_ids = self._path(node.id)
        is_root = node.id == 0
        return EvaluateRequest(
            tree=self.index, problem_id=self.tree.problem.problem_id, node_id=node.id, handle=node.handle,
            prompt=self.tree.problem.prompt, path_options=options, path_token_ids=token_ids,
            terminal=node.terminal, want_value=c.needs_value, want_prm=c.beta_prm > 0 and not is_root,
            want_orm=node.terminal, num_rollouts=0 if node.terminal or is_root else c.rollouts_per_node,
            seed=derive_seed(self.tree.problem.seed, _EVALUATE_STREAM, node.id),
        )

    # ----- results -----------------------------------------------------------------------------------
    def receive(self, slot: _Slot, request: ExpandRequest, result: ExpandResult,
                released: list[Any]) -> EvaluateRequest | None:
        """Take one sample: merge-check it, and return the evaluation of the node it became (if any)."""
        _check_expand_result(request, result)
        self.tree.generated_tokens += (result.generated_tokens if result.generated_tokens is not None
                                       else len(result.token_ids))
        slot.samples.append(result)
        self.option_samples += 1
        if slot.kind == COMPLETE:
            chosen = result
        else:
            siblings = [OptionSample(self.tree.nodes[c].option, self.embeddings.get(c))
                        for c in self.tree.nodes[slot.parent_id].children]
            samples = [OptionSample(s.text, s.embedding) for s in slot.samples]
            decision = self.merge.decide(samples, siblings)
            if decision.action == "resample":
                return None
            chosen = slot.samples[decision.index]
        released.extend(s.handle for s in slot.samples if s is not chosen and s.handle is not None)
        node = self._add_node(slot, chosen)
        slot.node_id = node.id
        return self.evaluate_request(node)

    def _add_node(self, slot: _Slot, result: ExpandResult) -> Node:
        parent = self.tree.nodes[slot.parent_id]
        depth = parent.depth + 1
        terminal = result.is_final or slot.kind == COMPLETE or depth >= self.config.max_depth
        node = self.tree.add_child(
            parent.id, option=result.text, option_token_ids=[int(t) for t in result.token_ids],
            option_logprob=float(result.logprob), terminal=terminal, answer=result.answer,
            finish_reason=result.finish_reason, merged=len(slot.samples) > 1, resamples=len(slot.samples) - 1,
            completion=slot.kind == COMPLETE, handle=result.handle,
        )
        if result.embedding is not None:
            self.embeddings[node.id] = result.embedding
        return node

    def apply_scores(self, node_id: int, scores: NodeScores) -> None:
        node = self.tree.nodes[node_id]
        where = f"problem {self.tree.problem.problem_id!r} node {node_id}"
        for name in ("value", "prm", "orm", "rollout_orm"):
            setattr(node, name, finite_or_none(getattr(scores, name), f"{name} of {where}"))
        node.rollouts = [dict(r, orm=finite_or_none(r.get("orm"), f"a rollout ORM of {where}"))
                         for r in scores.rollouts]
        self.tree.generated_tokens += int(scores.rollout_tokens)
        if node_id == 0:
            return
        node.reward = self._reward_of(node)
        if node.completion:
            self._set_answer(node.id, "greedy_q")
            return
        slot = next(s for s in self.slots if s.node_id == node_id)
        self.slots.remove(slot)
        for i in slot.path:
            self.tree.nodes[i].virtual_loss -= 1
        self.tree.nodes[slot.parent_id].pending_children -= 1
        self.tree.backpropagate(node_id, node.reward)
        self.tree.simulations += 1
        self.terminal_count += node.terminal

    def _reward_of(self, node: Node) -> float:
        """r(s) of a node, computed once from its critic scores; a terminal node is scored by the ORM alone."""
        c = self.config
        where = f"problem {self.tree.problem.problem_id!r} node {node.id}"
        if node.reward is not None:
            return node.reward
        if node.terminal:
            if node.orm is None:
                raise ValueError(f"the backend gave no ORM score for terminal {where}")
            scale = c.beta_v + c.beta_prm + c.beta_orm if c.terminal_reward == "orm_scaled" else 1.0
            return scale * node.orm
        reward = 0.0
        for beta, name in ((c.beta_v, "value"), (c.beta_prm, "prm"), (c.beta_orm, "rollout_orm")):
            if beta > 0:
                score = getattr(node, name)
                if score is None:
                    raise ValueError(f"the backend gave no {name} score for {where} (beta > 0 needs it)")
                reward += beta * score
        return reward

    # ----- the end -----------------------------------------------------------------------------------
    def _finish_search(self) -> None:
        choice = choose_answer(self.tree, self.config.answer_selection)
        if choice.needs_completion:
            self.phase = COMPLETING
            self.slots.append(_Slot(parent_id=choice.node_id, path=[], index=0, kind=COMPLETE))
        else:
            self._set_answer(choice.node_id, choice.method, choice.answer, choice.rollout)

    def _set_answer(self, node_id: int, method: str, answer: str | None = None,
                    rollout: int | None = None) -> None:
        self.slots.clear()
        self.tree.chosen_path = self.tree.path_to(node_id)
        self.tree.chosen_rollout = rollout
        self.tree.answer = answer if answer is not None else self.tree.nodes[node_id].answer
        self.tree.answer_method = method
        self.tree.extra.update(terminals=self.terminal_count, option_samples=self.option_samples,
                               rounds=self.rounds)
        self.phase = DONE

    def take_handles(self) -> list[Any]:
        """Every state the backend still holds for this tree (the tree forgets them)."""
        handles = []
        for node in self.tree.nodes:
            if node.handle is not None:
                handles.append(node.handle)
                node.handle = None
        return handles


def _check_expand_result(request: ExpandRequest, result: ExpandResult) -> None:
    where = f"problem {request.problem_id!r} expansion of node {request.parent_id}"
    if result.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{where}: finish_reason {result.finish_reason!r} is not one of {FINISH_REASONS}")
    if request.want_embedding and result.embedding is None:
        raise ValueError(f"{where}: cosine state merging needs ExpandResult.embedding")
    finite_or_none(result.logprob, f"{where}: logprob")


class LockstepMCTS:
    """Searches many problems in lockstep through one backend: `LockstepMCTS(backend, cfg).run(problems)`."""

    def __init__(self, backend: SearchBackend, config: MCTSConfig):
        self.backend = backend
        self.config = config
        self.stats = SearchStats()

    def _call(self, kind: str, requests: list) -> list:
        self.stats.record(kind, len(requests))
        results = getattr(self.backend, kind)(requests)
        if kind != "release" and len(results) != len(requests):
            raise ValueError(f"backend.{kind} returned {len(results)} results for {len(requests)} requests")
        return results

    def run(self, problems: Sequence[SearchProblem], *,
            on_tree_done: Callable[[Tree], None] | None = None) -> list[Tree]:
        """Search every problem; trees come back in problem order. `on_tree_done` sees each tree as it
        finishes (to write it at once, so a killed run keeps the finished ones)."""
        ids = [p.problem_id for p in problems]
        if len(set(ids)) != len(ids):
            raise ValueError("problem ids must be unique within one search")
        waiting = deque(enumerate(problems))
        limit = self.config.max_active_trees or max(1, len(problems))
        active: list[_TreeSearch] = []
        trees: list[Tree | None] = [None] * len(problems)
        while waiting or active:
            joining = []
            while waiting and len(active) + len(joining) < limit:
                index, problem = waiting.popleft()
                joining.append(_TreeSearch(index, problem, self.config))
            active.extend(joining)
            self._round(active, joining)
            for search in [s for s in active if s.phase == DONE]:
                trees[search.index] = search.tree
                if on_tree_done is not None:
                    on_tree_done(search.tree)
            active = [s for s in active if s.phase != DONE]
        return [t for t in trees if t is not None]

    def _round(self, active: list[_TreeSearch], joining: list[_TreeSearch]) -> None:
        self.stats.rounds += 1
        evaluations: list[tuple[_TreeSearch, EvaluateRequest]] = []
        if joining:
            handles = self._call("start", [s.root_request() for s in joining])
            for search, handle in zip(joining, handles):
                search.tree.root.handle = handle
                if self.config.needs_value:
                    evaluations.append((search, search.evaluate_request(search.tree.root)))
        expansions = [(s, slot, req) for s in active for slot, req in s.expansion_requests()]
        released: list[Any] = []
        if expansions:
            results = self._call("expand", [req for _, _, req in expansions])
            for (search, slot, request), result in zip(expansions, results):
                evaluation = search.receive(slot, request, result, released)
                if evaluation is not None:
                    evaluations.append((search, evaluation))
        if evaluations:
            scores = self._call("evaluate", [req for _, req in evaluations])
            for (search, request), score in zip(evaluations, scores):
                search.apply_scores(request.node_id, score)
        for search in active:
            if search.phase == DONE:
                released.extend(search.take_handles())
        if released:
            self._call("release", released)


def run_mcts(problems: Sequence[SearchProblem], backend: SearchBackend, config: MCTSConfig, *,
             on_tree_done: Callable[[Tree], None] | None = None) -> list[Tree]:
    """Search `problems` in lockstep; see `LockstepMCTS`."""
    return LockstepMCTS(backend, config).run(problems, on_tree_done=on_tree_done)
