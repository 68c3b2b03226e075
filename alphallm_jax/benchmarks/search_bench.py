"""`alphallm bench search`: eta-MCTS over many problems in lockstep versus one problem at a time.

Both sides run the same `run_mcts` with the same config, policy, critic and fast-rollout policy (a run
of `alphallm loop` or `alphallm train-critics` provides them), each on a fresh backend (fresh KV pools,
the jitted functions shared). Reported:

* `batched_nodes_per_s`: tree nodes (every option kept in a tree, roots excluded) per second when the
  `num_problems` trees advance together, so each round sends one batched request per kind;
* `sequential_nodes_per_s`: the same rate with one tree at a time, measured on the first
  `sequential_problems` of them (a rate, so a subset suffices; the whole set one by one takes long);
* `speedup`: the ratio of the two;
* `prefill_to_unique_tokens`: tokens the policy sampler prefilled during the batched search over the
  trees' unique tokens (each prompt once plus every option's tokens). 1.0 means no prefix was ever
  recomputed; forked expansions should keep it near 1.

Each side runs its workload twice on fresh backends and the second run is timed: the same problems and
seeds build the same trees, so the first run compiles every shape the timed one meets and neither rate
counts compilation. (A warm-up on fewer, other problems left the 64-tree batch shapes to compile inside
the timed lockstep run: with a cold compilation cache it reported a speed-up of 1.12 where the same run
with the cache warm gave 1.36.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from alphallm_jax.search.mcts import run_mcts
from alphallm_jax.search.tree import SearchProblem, Tree


def unique_tokens(trees: Sequence[Tree], prompt_tokens: dict[str, int]) -> int:
    """Each tree's prompt once plus the tokens of every option in it."""
    return sum(prompt_tokens[t.problem.problem_id] + sum(len(n.option_token_ids) for n in t.nodes[1:])
               for t in trees)


def tree_nodes(trees: Sequence[Tree]) -> int:
    return sum(len(t.nodes) - 1 for t in trees)


def _timed_search(make_backend, problems: Sequence[SearchProblem], mcts_cfg, *, one_at_a_time: bool):
    backend = make_backend()
    before = backend.sampler.stats.prefilled_tokens
    start = time.perf_counter()
    if one_at_a_time:
        trees = [tree for p in problems for tree in run_mcts([p], backend, mcts_cfg)]
    else:
        trees = run_mcts(problems, backend, mcts_cfg)
    seconds = time.perf_counter() - start
    return trees, seconds, backend.sampler.stats.prefilled_tokens - before


def run_search_bench(make_backend, problems: Sequence[SearchProblem], mcts_cfg, prompt_tokens: dict[str, int], *,
                     sequential_problems: int) -> dict[str, Any]:
    """`make_backend()` gives a fresh backend over the same models; see the module doc."""
    if len(problems) < 1 or sequential_problems < 1:
        raise ValueError("need at least one problem on each side")
    seq_set = problems[:sequential_problems]

    def second_run(work, one_at_a_time):
        first = _timed_search(make_backend, work, mcts_cfg, one_at_a_time=one_at_a_time)  # compiles
        second = _timed_search(make_backend, work, mcts_cfg, one_at_a_time=one_at_a_time)
        if [t.to_records() for t in first[0]] != [t.to_records() for t in second[0]]:
            raise RuntimeError("the search built other trees on its second run: the bench times the second")
        return second

    batched, batched_s, prefilled = second_run(problems, False)
    sequential, sequential_s, _ = second_run(seq_set, True)
    batched_rate = tree_nodes(batched) / batched_s
    sequential_rate = tree_nodes(sequential) / sequential_s
    unique = unique_tokens(batched, prompt_tokens)
    return {
        "batched_nodes_per_s": batched_rate, "sequential_nodes_per_s": sequential_rate,
        "speedup": batched_rate / sequential_rate, "prefill_to_unique_tokens": prefilled / unique,
        "batched": {"problems": len(problems), "nodes": tree_nodes(batched), "seconds": batched_s,
                    "prefilled_tokens": prefilled, "unique_tokens": unique},
        "sequential": {"problems": len(seq_set), "nodes": tree_nodes(sequential), "seconds": sequential_s},
        "timed_run": "second of two (the first compiles)",
    }
