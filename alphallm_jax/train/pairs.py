"""Training data from search trees: SFT traces and trajectory pairs (AlphaLLM-CPL section 3.1).

Input: the search's tree files (JSONL, one per problem): a ``"problem"`` header line, then one
``"node"`` line per node (ids 0..n-1, root 0, ``Q``/``N``, critic scores, ``option`` and
``option_token_ids``; written and read by ``search.tree``). A node's full solution is the header ``prompt`` followed by
the options along the root -> node path. Only critic scores and Q choose traces and pairs: the
prompts are synthetic and unlabelled, so the header's ``reference`` is never read.

Definitions (the knobs are ``ExtractionConfig`` fields, set from ``cfg.policy_train``):

* complete trajectory: root -> a ``terminal`` node that ended the solution: at EOS, or with a final
  answer and not cut off by the token limit. Terminals cut at ``max_depth`` (no answer, ended at a
  stop string) or by ``"length"`` are not finished solutions. The search's ``completion`` nodes
  (the greedy path rolled out to the end, never visited) count as ends too;
* critic score of a terminal: ``node.<score_field>`` (default ``"reward"``, the search's combined
  r(s), which for a terminal is its ORM score), falling back to ``reward`` then ``orm``;
* best completion of a node u (``completion``):
  ``"best_terminal"`` (default): the complete terminal in u's subtree (u included) with the highest
  critic score (ties: higher Q, then smaller id), i.e. the best end the search found from u;
  ``"greedy_q"``: from u, step to the child with the highest Q among the children that have a
  complete terminal below them, until a complete terminal (the search's own answer rule, kept to
  ends that exist in the tree). A node with no complete terminal below it is in no pair: the
  tree holds no end for it (rollout texts are not stored).

Records (JSONL artifacts, written with ``write_records``):

* SFT trace (``kind = "sft_trace"``): per problem the complete trajectory with the best critic
  score, kept when its ORM (``orm``, else ``reward``) >= ``orm_threshold``. With
  ``sft_selection = "answer_vote"`` the candidates are only the complete trajectories that reach the
  winner of the search's ORM-weighted vote over its terminals and fast rollouts
  (``search.answers.vote_share``; on MATH, or an answer math-verify finds equal to it), and the problem is skipped when the winner holds less than
  ``min_vote_share`` of the ORM mass: the trace then agrees with the answer the search reports, and
  problems the search is unsure about train nothing. ``sft_traces_per_prompt = k`` keeps up to the k
  best such trajectories of distinct text (each with ORM >= ``orm_threshold``), the trace ``rank``
  0, 1, ...: more data per searched prompt for no more search (rejection-sampling fine-tuning keeps
  every accepted sample the same way);
* stepwise pair: two children u, v of one parent, both visited, with ``Q(u) - Q(v) > tau``;
* complete pair: two complete trajectories with ``value(s) - value(t) > tau``, value =
  ``node.<complete_value_field>`` (default the leaf's Q, as in the paper);
* Q pair (the AlphaLLM-Q baseline, Xie et al. 2024): per depth d >= 1, the highest-Q versus the
  lowest-Q node of that depth (visited, with a completion) when their gap exceeds
  ``q_pairs_min_gap``.

A pair of nodes (u, v) continued to leaves (u', v') is stored as prompt = header prompt + options
root -> a, with a = the lowest common ancestor of u and v (the shared parent for stepwise pairs),
chosen = options a -> u', rejected = options a -> v'. For complete and Q pairs, whose trajectories
need not share a prefix, moving a shared prefix into the prompt changes nothing: its tokens add the
same log-probability to both sides, which cancels in the DPO margin, in CPL's policy gap p_g and
(its step rewards) in the reward gap r_g; it only saves compute. A pair whose chosen and rejected
responses are the same tokens (twin nodes of one text, which a search without state merging samples)
is left out: it states no preference.

Each side carries its per-step critic rewards (``step_reward_field`` per node on a -> leaf, falling
back to ``reward``, then ``orm``, then 0): CPL's r_g is ``sum(chosen.step_rewards) - sum(rejected.step_rewards)``,
stored as ``reward_gap``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

from alphallm_jax.search.answers import vote_share
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.tree import Node, Tree
from alphallm_jax.utils.io import as_path, write_jsonl_atomic

log = logging.getLogger(__name__)

PAIR_KINDS = ("stepwise", "complete", "q_pair")
COMPLETIONS = ("best_terminal", "greedy_q")
SFT_SELECTIONS = ("best_score", "answer_vote")
SCORE_FIELDS = ("reward", "orm", "value", "prm", "rollout_orm", "Q")


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    """How traces and pairs are read off the trees (see the module doc)."""

    tau: float = 1.0  # minimum value gap of a pair (the paper's margin; its setting: 1)
    orm_threshold: float = 0.5  # an SFT trace is kept when its leaf's ORM is at least this
    score_field: str = "reward"  # critic score of a terminal (SFT choice, best_terminal)
    complete_value_field: str = "Q"  # the value compared for complete pairs
    completion: str = "best_terminal"  # best_terminal | greedy_q
    step_reward_field: str = "reward"  # per-step critic reward summed into CPL's r_g
    min_visits: int = 1  # nodes with fewer visits have no Q estimate and are in no pair
    max_pairs_per_prompt: int = 0  # per kind and problem, largest gaps first; 0: all
    q_pairs_min_gap: float = 0.0
    sft_selection: str = "best_score"  # best_score (the paper's) | answer_vote (see the module doc)
    min_vote_share: float = 0.0  # answer_vote: the winner's least share of the ORM mass
    sft_traces_per_prompt: int = 1  # the best k complete trajectories of distinct text (1: the paper's)

    def __post_init__(self):
        if self.completion not in COMPLETIONS:
            raise ValueError(f"completion={self.completion!r}; choose from {COMPLETIONS}")
        if self.sft_selection not in SFT_SELECTIONS:
            raise ValueError(f"sft_selection={self.sft_selection!r}; choose from {SFT_SELECTIONS}")
        if not 0.0 <= self.min_vote_share <= 1.0:
            raise ValueError(f"min_vote_share={self.min_vote_share!r} must lie in [0, 1]")
        if self.sft_traces_per_prompt < 1:
            raise ValueError(f"sft_traces_per_prompt={self.sft_traces_per_prompt!r} must be at least 1")
        for name in ("score_field", "complete_value_field", "step_reward_field"):
            if getattr(self, name) not in SCORE_FIELDS:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose from {SCORE_FIELDS}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ExtractionConfig:
        """The fields present in a dict or ConfigDict (e.g. ``cfg.policy_train``); others ignored."""
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def q_scale(beta_v: float, beta_prm: float, beta_orm: float) -> float:
    """The width of the interval every node's Q lies in, [0, this]: an interior node's reward is
    beta_v * v + beta_prm * PRM + beta_orm * ORM with each critic score in [0, 1], a terminal's its ORM
    (at most 1) or, with `terminal_reward="orm_scaled"`, that ORM times the betas' sum."""
    return max(beta_v + beta_prm + beta_orm, 1.0)


def terminal_q_scale(mcts: MCTSConfig, value_field: str = "Q") -> float:
    """The width of the interval a complete trajectory's `value_field` lies in, [0, this]: a terminal's
    reward (and so its Q) is its ORM, at most 1, or with `terminal_reward="orm_scaled"` that ORM times the
    betas' sum; a single critic score ("orm", "value", ...) is at most 1."""
    if value_field in ("Q", "reward") and mcts.terminal_reward == "orm_scaled":
        return q_scale(mcts.beta_v, mcts.beta_prm, mcts.beta_orm)
    return 1.0


def check_pair_margin(tau: float, mcts: MCTSConfig, complete_value_field: str = "Q") -> None:
    """Refuses a pair margin `tau` that no two siblings' Q can exceed on the scale of the search `mcts`
    configures (CPL would get no stepwise pair at all), and warns when no two complete trajectories'
    `complete_value_field` can (no complete pair: with the paper's terminal reward, the bare ORM, a
    complete trajectory's Q lies in [0, 1] while an interior node's reaches the betas' sum; CPL then
    trains on stepwise pairs alone and the complete-only ordering on none). (The paper's margin, 1, is
    on its own value scale, which it does not state.)"""
    betas = f"beta_v={mcts.beta_v:g}, beta_prm={mcts.beta_prm:g}, beta_orm={mcts.beta_orm:g}"
    scale = q_scale(mcts.beta_v, mcts.beta_prm, mcts.beta_orm)
    if tau >= scale:
        raise ValueError(f"policy_train.tau={tau:g}: no two Q values can differ by more than that, since every "
                         f"Q lies in [0, {scale:g}] with search.mcts {betas}; no stepwise or complete pair "
                         f"could be extracted. Set tau below {scale:g}")
    terminal = terminal_q_scale(mcts, complete_value_field)
    if tau >= terminal:
        log.warning("policy_train.tau=%g: no complete pair can be extracted, since a complete trajectory's %s "
                    "(policy_train.complete_value_field) lies in [0, %g] with search.mcts.terminal_reward=%r and "
                    "%s: CPL trains on stepwise pairs alone. Set tau below %g, or terminal_reward='orm_scaled' "
                    "to put terminals on the interior nodes' scale", tau, complete_value_field, terminal,
                    mcts.terminal_reward, betas, terminal)


def largest_sibling_gap(trees: Iterable[Tree], min_visits: int = 1) -> float:
    """The largest Q gap between two children of one parent, both visited at least `min_visits` times,
    over `trees` (0 where no parent has two): what a stepwise pair's margin `tau` is compared with."""
    largest = 0.0
    for tree in trees:
        for parent in tree.nodes:
            qs = [float(tree.nodes[c].Q) for c in parent.children if tree.nodes[c].N >= min_visits]
            if len(qs) >= 2:
                largest = max(largest, max(qs) - min(qs))
    return largest


# --------------------------------------------------------------------------------------- trees
def tree_dirs(trees_dir: str | os.PathLike) -> list[epath.Path]:
    """The tree directories a ``policy_train.trees_dir`` value names: one directory, or several joined
    by commas (the loop's SFT on every iteration's trees so far, ``loop.sft_traces = "accumulated"``).
    A comma may also sit inside a directory's own name (a workdir called ``run,2``): the value is read as
    the one way it splits into existing directories, and fails where it splits into none or into several."""
    text = str(trees_dir)
    parts = text.split(",")
    ways = [1] + [0] * len(parts)  # ways[i]: how many splits of parts[:i] into existing directories
    split: dict[int, list[str]] = {0: []}  # one such split per reachable i
    for i in range(len(parts)):
        if not ways[i]:
            continue
        for j in range(i + 1, len(parts) + 1):
            name = ",".join(parts[i:j]).strip()
            if name and as_path(name).is_dir():
                ways[j] += ways[i]
                split.setdefault(j, [*split[i], name])
    if ways[-1] == 1:
        return [as_path(name) for name in split[len(parts)]]
    if ways[-1] > 1:
        raise ValueError(f"policy_train.trees_dir={text!r} splits at its commas into existing directories in "
                         f"{ways[-1]} ways, e.g. {split[len(parts)]}: rename a directory whose name holds a comma")
    if not all(part.strip() for part in parts):
        raise ValueError(f"policy_train.trees_dir={text!r} names an empty directory")
    rest = ",".join(parts[max(split):]).strip()
    raise FileNotFoundError(f"trees directory {rest} does not exist, nor does any start of it before a comma "
                            f"(policy_train.trees_dir={text!r})")


def read_trees(trees_dir: str | os.PathLike | Sequence[epath.Path]) -> list[Tree]:
    """Every ``*.jsonl`` tree under ``trees_dir`` (a ``policy_train.trees_dir`` value, see ``tree_dirs``, or
    the directories it names; sorted by file name within each, so the order is fixed), read and checked
    by the search's own reader (``Tree.load``). One problem's tree in two of the directories is an error:
    it would train twice."""
    roots = trees_dir if isinstance(trees_dir, (list, tuple)) else tree_dirs(trees_dir)
    paths: dict[str, epath.Path] = {}
    for root in roots:
        for path in sorted(root.glob("*.jsonl"), key=lambda p: p.name):
            if path.name in paths:
                raise ValueError(f"tree {path.name} is in both {paths[path.name].parent} and {root}: "
                                 f"policy_train.trees_dir must name directories of distinct problems")
            paths[path.name] = path
    return [Tree.load(p) for p in paths.values()]


# ------------------------------------------------------------------------------------- scoring
def _field(node: Node, name: str, default: float) -> float:
    """``node.<name>``, else its ``reward``, else its ``orm``, else ``default``."""
    for key in (name, "reward", "orm"):
        value = getattr(node, key)
        if value is not None:
            return float(value)
    return default


def is_complete(node: Node) -> bool:
    """A terminal that finished the solution (see the module doc)."""
    finish = node.finish_reason
    return node.terminal and (finish == "eos" or (node.answer is not None and finish != "length"))


def _best_key(node: Node, score_field: str) -> tuple[float, float, int]:
    """Higher critic score, then higher Q, then smaller id."""
    return (_field(node, score_field, -math.inf), node.Q, -node.id)


def completions(tree: Tree, cfg: ExtractionConfig) -> list[int | None]:
    """The best completion (a complete terminal id) of every node, None where there is none."""
    nodes = tree.nodes
    by_depth = sorted(range(len(nodes)), key=lambda i: -nodes[i].depth)
    best: list[int | None] = [None] * len(nodes)
    for i in by_depth:  # children before parents
        if is_complete(nodes[i]):
            best[i] = i
            continue
        found = [best[c] for c in nodes[i].children if best[c] is not None]
        if found:
            best[i] = max(found, key=lambda t: _best_key(nodes[t], cfg.score_field))
    if cfg.completion == "best_terminal":
        return best
    greedy: list[int | None] = [None] * len(nodes)
    for i in range(len(nodes)):
        if best[i] is None:
            continue
        u = i
        while not is_complete(nodes[u]):
            viable = [c for c in nodes[u].children if best[c] is not None]
            u = max(viable, key=lambda c: (float(nodes[c].Q), -c))
        greedy[i] = u
    return greedy


# ------------------------------------------------------------------------------------- records
def extract_sft_traces(tree: Tree, cfg: ExtractionConfig) -> list[dict[str, Any]]:
    """The problem's best complete trajectories by critic score (with ``answer_vote``: among those
    reaching the vote's winner), up to ``sft_traces_per_prompt`` of distinct text, each with ORM >=
    ``orm_threshold``; none when the winner's vote share is below ``min_vote_share``."""
    leaves = [n for n in tree.nodes if is_complete(n)]
    share = None
    if cfg.sft_selection == "answer_vote":
        vote = vote_share(tree)
        if vote is None or vote[1] < cfg.min_vote_share:
            return []
        share = vote[1]
        leaves = [n for n in leaves if n.answer in vote[2]]
    traces: list[dict[str, Any]] = []
    seen: set[str] = set()
    for leaf in sorted(leaves, key=lambda n: _best_key(n, cfg.score_field), reverse=True):
        orm = _field(leaf, "orm", -math.inf)
        if len(traces) == cfg.sft_traces_per_prompt or orm < cfg.orm_threshold:
            break  # the paper's rule: a best trace under the threshold drops the problem; later ranks stop there too
        path = tree.path_below(0, leaf.id)
        text = tree.text(path)
        if text in seen:  # the search's exact repeats (no state merging) would weight one solution twice
            continue
        seen.add(text)
        traces.append({
            "kind": "sft_trace", "problem_id": tree.problem.problem_id, "prompt": tree.problem.prompt,
            "leaf": leaf.id, "rank": len(traces), "path": path, "text": text,
            "token_ids": tree.token_ids(path), "score": _field(leaf, cfg.score_field, -math.inf),
            "orm": orm, "q": float(leaf.Q), "answer": leaf.answer, "finish_reason": leaf.finish_reason,
            "vote_share": share,
        })
    return traces


def _side(tree: Tree, prefix: int, node: int, leaf: int, value: float,
          cfg: ExtractionConfig) -> dict[str, Any]:
    path = tree.path_below(prefix, leaf)
    leaf_node = tree.nodes[leaf]
    return {
        "node": node, "leaf": leaf, "path": path, "q": float(tree.nodes[node].Q), "value": value,
        "leaf_q": float(leaf_node.Q), "leaf_score": _field(leaf_node, cfg.score_field, -math.inf),
        "leaf_orm": leaf_node.orm, "answer": leaf_node.answer,
        "finish_reason": leaf_node.finish_reason,
        "text": tree.text(path), "token_ids": tree.token_ids(path),
        "step_rewards": [_field(tree.nodes[i], cfg.step_reward_field, 0.0) for i in path],
    }


def _pair(tree: Tree, kind: str, u: int, v: int, value_u: float, value_v: float,
          best: Sequence[int | None], cfg: ExtractionConfig) -> dict[str, Any]:
    """``u`` preferred over ``v``: the record described in the module doc."""
    prefix = tree.lca(u, v)
    prefix_path = tree.path_below(0, prefix)
    chosen = _side(tree, prefix, u, best[u], value_u, cfg)
    rejected = _side(tree, prefix, v, best[v], value_v, cfg)
    return {
        "kind": kind, "pair_id": f"{tree.problem.problem_id}/{kind}/{u}-{v}", "problem_id": tree.problem.problem_id,
        "prompt": tree.problem.prompt, "prefix_node": prefix, "prefix_path": prefix_path,
        "prefix_text": tree.text(prefix_path), "prefix_token_ids": tree.token_ids(prefix_path),
        "depth": int(tree.nodes[u].depth), "gap": value_u - value_v,
        "reward_gap": sum(chosen["step_rewards"]) - sum(rejected["step_rewards"]),
        "chosen": chosen, "rejected": rejected,
    }


def _cap(candidates: list[tuple[int, int, float, float]], limit: int) -> list[tuple[int, int, float, float]]:
    """At most ``limit`` (u, v, value_u, value_v), largest gaps first, kept in enumeration order."""
    if limit <= 0 or len(candidates) <= limit:
        return candidates
    ranked = sorted(range(len(candidates)),
                    key=lambda i: (-(candidates[i][2] - candidates[i][3]), candidates[i][0], candidates[i][1]))
    return [candidates[i] for i in sorted(ranked[:limit])]


def _records(tree: Tree, kind: str, candidates: list[tuple[int, int, float, float]],
             best: Sequence[int | None], cfg: ExtractionConfig) -> list[dict[str, Any]]:
    """The pair records of ``candidates`` (largest gaps first up to the cap), leaving out pairs whose two
    responses are the same tokens: twin nodes of one text (a search without state merging samples
    repeats) whose Q differ by their rollouts alone state no preference, and give DPO no gradient."""
    records = [_pair(tree, kind, *c, best, cfg) for c in candidates]
    distinct = {c: r for c, r in zip(candidates, records)
                if r["chosen"]["token_ids"] != r["rejected"]["token_ids"]}
    return [distinct[c] for c in _cap(list(distinct), cfg.max_pairs_per_prompt)]


def _ordered(a: int, b: int, va: float, vb: float) -> tuple[int, int, float, float]:
    """(better, worse, its value, the other's value); ties never reach here (gap > tau >= 0)."""
    return (a, b, va, vb) if va > vb else (b, a, vb, va)


def extract_pairs(tree: Tree, cfg: ExtractionConfig,
                  kinds: Sequence[str] = PAIR_KINDS) -> list[dict[str, Any]]:
    """The problem's pair records of ``kinds`` (stepwise, then complete, then Q pairs)."""
    unknown = set(kinds) - set(PAIR_KINDS)
    if unknown:
        raise ValueError(f"unknown pair kinds {sorted(unknown)}; choose from {PAIR_KINDS}")
    nodes = tree.nodes
    best = completions(tree, cfg)

    def usable(i: int) -> bool:
        return best[i] is not None and nodes[i].N >= cfg.min_visits

    out: list[dict[str, Any]] = []
    if "stepwise" in kinds:
        cands = []
        for parent in nodes:
            kids = sorted(c for c in parent.children if usable(c))
            for a, b in itertools.combinations(kids, 2):
                qa, qb = float(nodes[a].Q), float(nodes[b].Q)
                if abs(qa - qb) > cfg.tau:
                    cands.append(_ordered(a, b, qa, qb))
        out += _records(tree, "stepwise", cands, best, cfg)
    if "complete" in kinds:
        leaves = [n.id for n in nodes if is_complete(n) and n.N >= cfg.min_visits]
        cands = []
        for a, b in itertools.combinations(leaves, 2):
            va = _field(nodes[a], cfg.complete_value_field, -math.inf)
            vb = _field(nodes[b], cfg.complete_value_field, -math.inf)
            if abs(va - vb) > cfg.tau and tree.lca(a, b) not in (a, b):
                cands.append(_ordered(a, b, va, vb))
        out += _records(tree, "complete", cands, best, cfg)
    if "q_pair" in kinds:
        cands = []
        depths = sorted({int(n.depth) for n in nodes if n.depth >= 1})
        for d in depths:
            level = [n.id for n in nodes if n.depth == d and usable(n.id)]
            if len(level) < 2:
                continue
            hi = max(level, key=lambda i: (float(nodes[i].Q), -i))
            lo = min(level, key=lambda i: (float(nodes[i].Q), i))
            q_hi, q_lo = float(nodes[hi].Q), float(nodes[lo].Q)
            if q_hi - q_lo > cfg.q_pairs_min_gap:
                cands.append((hi, lo, q_hi, q_lo))
        out += _records(tree, "q_pair", cands, best, cfg)
    return out


def extract_all(trees: Iterable[Tree], cfg: ExtractionConfig,
                kinds: Sequence[str] = PAIR_KINDS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(SFT traces, pairs) over all trees, in tree order."""
    traces, pairs = [], []
    for tree in trees:
        traces += extract_sft_traces(tree, cfg)
        pairs += extract_pairs(tree, cfg, kinds)
    return traces, pairs


def write_records(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Records as a JSONL artifact, written atomically."""
    write_jsonl_atomic(path, records)


def pair_counts(pairs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = {k: 0 for k in PAIR_KINDS}
    for p in pairs:
        counts[p["kind"]] += 1
    return counts
