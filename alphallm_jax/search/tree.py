"""The host-side search tree: nodes with visit statistics and critic scores, and its JSONL form.

A tree file holds one header line (``kind: "problem"``) and one line per node (``kind: "node"``, ids
0..n-1, the root is 0). The full solution text of a node is the header's prompt followed by the options
along the root->node path (each option carries its own trailing newline). See `Tree.to_records`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alphallm_jax.utils.io import DataFormatError, PathLike, iter_jsonl, write_jsonl_atomic

FINISH_REASONS = ("stop", "eos", "length")


@dataclasses.dataclass(frozen=True)
class SearchProblem:
    """One problem to search. `prompt` is the exact text the policy continues."""

    problem_id: str
    prompt: str
    question: str = ""
    reference: str | None = None  # the reference answer; None for synthesized prompts
    task: str = ""
    seed: int = 0  # the tree's seed: every sample and rollout seed derives from it


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers: the same parts give the same seed, whatever the batching."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF


def problem_seed(base_seed: int, problem_id: str) -> int:
    """A per-problem seed that depends only on the run seed and the problem id (not on its position)."""
    return derive_seed(base_seed, zlib.crc32(problem_id.encode("utf-8")))


@dataclasses.dataclass(eq=False)
class Node:
    """One state of the search: the root (the prompt) or the state after one more option."""

    id: int
    parent: int | None
    depth: int
    option: str = ""
    option_token_ids: list[int] = dataclasses.field(default_factory=list)
    option_logprob: float = 0.0  # sum of the option's token log-probabilities under the policy
    N: int = 0
    W: float = 0.0
    value: float | None = None
    prm: float | None = None
    orm: float | None = None
    rollout_orm: float | None = None  # mean ORM over the fast rollouts
    reward: float | None = None  # the combined r(s) backpropagated for this node
    terminal: bool = False
    answer: str | None = None
    finish_reason: str | None = None
    merged: bool = False  # a near-duplicate was resampled at this slot
    resamples: int = 0
    children: list[int] = dataclasses.field(default_factory=list)
    # Added after the search to complete the greedy-Q path to the end; never backpropagated.
    completion: bool = False
    # The fast rollouts from this node: {"text" (after the node), "answer", "orm"} (NodeScores.rollouts).
    rollouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Host-only search state, never serialised.
    virtual_loss: int = 0  # selections in flight through this node
    pending_children: int = 0  # expansions of this node in flight
    expansions_requested: int = 0  # expansion slots opened so far (seeds the slot's samples)
    handle: Any = None  # the backend's state after this node (e.g. a KV cache entry)

    @property
    def Q(self) -> float:  # noqa: N802 - the papers' name
        return self.W / self.N if self.N else 0.0

    @property
    def normalized_logprob(self) -> float:
        """The option's log-probability per token: PUCT's prior before normalisation over siblings."""
        return self.option_logprob / max(1, len(self.option_token_ids))

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "node", "id": self.id, "parent": self.parent, "depth": self.depth, "option": self.option,
            "option_token_ids": [int(t) for t in self.option_token_ids],
            "option_logprob": float(self.option_logprob), "N": self.N, "W": float(self.W), "Q": float(self.Q),
            "value": _opt_float(self.value), "prm": _opt_float(self.prm), "orm": _opt_float(self.orm),
            "rollout_orm": _opt_float(self.rollout_orm), "reward": _opt_float(self.reward),
            "terminal": self.terminal, "answer": self.answer, "finish_reason": self.finish_reason,
            "merged": self.merged, "resamples": self.resamples, "children": list(self.children),
            "completion": self.completion, "rollouts": [dict(r) for r in self.rollouts],
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Node:
        return cls(
            id=int(r["id"]), parent=r["parent"], depth=int(r["depth"]), option=r["option"],
            option_token_ids=[int(t) for t in r["option_token_ids"]], option_logprob=float(r["option_logprob"]),
            N=int(r["N"]), W=float(r["W"]), value=r["value"], prm=r["prm"], orm=r["orm"],
            rollout_orm=r["rollout_orm"], reward=r["reward"], terminal=bool(r["terminal"]), answer=r["answer"],
            finish_reason=r["finish_reason"], merged=bool(r["merged"]), resamples=int(r["resamples"]),
            children=[int(c) for c in r["children"]], completion=bool(r.get("completion", False)),
            rollouts=[dict(x) for x in r.get("rollouts") or []],
        )


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


NODE_KEYS = tuple(Node(0, None, 0).to_record())
OPTIONAL_NODE_KEYS = ("completion", "rollouts")  # absent from tree files written before they existed
HEADER_KEYS = ("kind", "problem_id", "question", "prompt", "reference", "task", "config", "seed",
               "chosen_path", "answer", "answer_method", "num_nodes", "generated_tokens", "simulations")
OPTIONAL_HEADER_KEYS = ("chosen_rollout",)


@dataclasses.dataclass(eq=False)
class Tree:
    """A search tree over one problem, with what the search chose."""

    problem: SearchProblem
    config: dict[str, Any]
    nodes: list[Node] = dataclasses.field(default_factory=list)
    chosen_path: list[int] = dataclasses.field(default_factory=list)
    answer: str | None = None
    answer_method: str = ""
    # The answer came from this rollout of the chosen path's last node (`orm_vote_rollouts`), else None.
    chosen_rollout: int | None = None
    generated_tokens: int = 0
    simulations: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra header fields

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes.append(Node(id=0, parent=None, depth=0))

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __len__(self) -> int:
        return len(self.nodes)

    def add_child(self, parent_id: int, **fields: Any) -> Node:
        parent = self.nodes[parent_id]
        node = Node(id=len(self.nodes), parent=parent_id, depth=parent.depth + 1, **fields)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path_to(self, node_id: int) -> list[int]:
        """Node ids from the root to `node_id`, both included."""
        path = []
        current: int | None = node_id
        while current is not None:
            path.append(current)
            current = self.nodes[current].parent
        return path[::-1]

    def path_below(self, ancestor: int, node_id: int) -> list[int]:
        """Node ids strictly below `ancestor` down to `node_id` (an ancestor of it or itself)."""
        path = self.path_to(node_id)
        return path[path.index(ancestor) + 1:]

    def lca(self, u: int, v: int) -> int:
        """The lowest common ancestor of two nodes."""
        common = 0
        for a, b in zip(self.path_to(u), self.path_to(v), strict=False):
            if a != b:
                break
            common = a
        return common

    def token_ids(self, ids: Iterable[int]) -> list[int]:
        """The option tokens of the nodes `ids`, concatenated."""
        return [int(t) for i in ids for t in self.nodes[i].option_token_ids]

    def text(self, ids: Iterable[int]) -> str:
        """The options of the nodes `ids`, concatenated."""
        return "".join(self.nodes[i].option for i in ids)

    def options_to(self, node_id: int) -> list[Node]:
        """The nodes whose options make up the state of `node_id` (the root's empty option excluded)."""
        return [self.nodes[i] for i in self.path_to(node_id)[1:]]

    def solution_text(self, node_id: int, *, with_prompt: bool = False) -> str:
        text = "".join(n.option for n in self.options_to(node_id))
        return self.problem.prompt + text if with_prompt else text

    def chosen_text(self) -> str:
        """The solution the search chose: its path's options, then the chosen rollout's text if any
        ("" when it chose nothing)."""
        if not self.chosen_path:
            return ""
        last = self.nodes[self.chosen_path[-1]]
        tail = last.rollouts[self.chosen_rollout]["text"] if self.chosen_rollout is not None else ""
        return self.solution_text(last.id) + tail

    def backpropagate(self, node_id: int, reward: float) -> None:
        """N += 1 and W += reward on the node and every ancestor."""
        for i in self.path_to(node_id):
            self.nodes[i].N += 1
            self.nodes[i].W += reward

    def terminals(self, *, include_completions: bool = False) -> list[Node]:
        return [n for n in self.nodes if n.terminal and (include_completions or not n.completion)]

    def header(self) -> dict[str, Any]:
        return {
            "kind": "problem", "problem_id": self.problem.problem_id, "question": self.problem.question,
            "prompt": self.problem.prompt, "reference": self.problem.reference, "task": self.problem.task,
            "config": dict(self.config), "seed": self.problem.seed, "chosen_path": list(self.chosen_path),
            "answer": self.answer, "answer_method": self.answer_method, "chosen_rollout": self.chosen_rollout,
            "num_nodes": len(self.nodes),
            "generated_tokens": int(self.generated_tokens), "simulations": int(self.simulations),
            **self.extra,
        }

    def to_records(self) -> list[dict[str, Any]]:
        return [self.header(), *(n.to_record() for n in self.nodes)]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Tree:
        header, node_records = _split_records(records, where="records")
        problem = SearchProblem(
            problem_id=header["problem_id"], prompt=header["prompt"], question=header["question"],
            reference=header["reference"], task=header["task"], seed=int(header["seed"]),
        )
        extra = {k: v for k, v in header.items() if k not in HEADER_KEYS + OPTIONAL_HEADER_KEYS}
        return cls(
            problem=problem, config=dict(header["config"]), nodes=[Node.from_record(r) for r in node_records],
            chosen_path=[int(i) for i in header["chosen_path"]], answer=header["answer"],
            answer_method=header["answer_method"], generated_tokens=int(header["generated_tokens"]),
            chosen_rollout=None if header.get("chosen_rollout") is None else int(header["chosen_rollout"]),
            simulations=int(header["simulations"]), extra=extra,
        )

    def save(self, path: PathLike) -> None:
        write_tree(path, self)

    @classmethod
    def load(cls, path: PathLike) -> Tree:
        header, nodes = load_tree(path)
        return cls.from_records([header, *nodes])


def write_tree(path: PathLike, tree: Tree) -> None:
    """Write the tree as JSONL atomically (a reader sees the old file or the whole new one)."""
    write_jsonl_atomic(path, tree.to_records())


def load_tree(path: PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a tree file: (header, node records in id order). Malformed files raise DataFormatError."""
    return _split_records([row for _, row in iter_jsonl(path)], where=str(path))


def _split_records(records: Iterable[dict[str, Any]], *, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = list(records)
    if not records or not isinstance(records[0], dict) or records[0].get("kind") != "problem":
        raise DataFormatError(where, 1, 'a tree file starts with a {"kind": "problem"} header line')
    header, nodes = records[0], records[1:]
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise DataFormatError(where, 1, f"tree header lacks {missing}")
    for i, r in enumerate(nodes):
        line = i + 2
        if not isinstance(r, dict) or r.get("kind") != "node":
            raise DataFormatError(where, line, 'expected a {"kind": "node"} line')
        lacking = [k for k in NODE_KEYS if k not in r and k not in OPTIONAL_NODE_KEYS]
        if lacking:
            raise DataFormatError(where, line, f"node lacks {lacking}")
        if r["id"] != i:
            raise DataFormatError(where, line, f"node ids must run 0..n-1 in order; found {r['id']} at {i}")
        if (r["parent"] is None) != (i == 0):
            raise DataFormatError(where, line, "the root (id 0) and only the root has parent null")
        if r["parent"] is not None and not 0 <= r["parent"] < len(nodes):
            raise DataFormatError(where, line, f"parent {r['parent']} is not a node id")
        if any(not isinstance(c, int) or not 0 < c < len(nodes) for c in r["children"]):
            raise DataFormatError(where, line, f"children {r['children']} are not node ids")
    if not nodes:
        raise DataFormatError(where, None, "no nodes (a tree has at least its root)")
    for i, r in enumerate(nodes):  # links agree both ways (every node was checked above)
        if r["parent"] is not None and i not in nodes[r["parent"]]["children"]:
            raise DataFormatError(where, i + 2, f"parent {r['parent']} does not list node {i} as a child")
        if any(nodes[c]["parent"] != i for c in r["children"]):
            raise DataFormatError(where, i + 2, f"children {r['children']} do not name node {i} as parent")
    if header["num_nodes"] != len(nodes):
        raise DataFormatError(where, 1, f"header says {header['num_nodes']} nodes, the file has {len(nodes)}")
    return header, nodes


def finite_or_none(x: float | None, what: str) -> float | None:
    """Scores must be finite to be written as JSON (NaN is rejected by the writers)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} is {x}; critic scores must be finite")
    return x
