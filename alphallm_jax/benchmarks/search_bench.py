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

To say how much batching can give on the machine at hand, the bench also reports, per sampler the
search uses (the policy's, and the fast-rollout policy's when there is one), the mean rows of its
prefill-and-decode rounds in each mode (`rows_per_round`) and what decoding costs per row and token at
those two batch sizes, measured on a fresh backend (`decode_row_cost`): `decode_batching_gain` is the
ratio, the most that batching the decoding itself can give (a device that runs small batches at a
fraction of its throughput gains much; two CPU cores, whose per-row cost hardly falls with the batch,
little).

Each side first runs its workload once untimed on a fresh backend: the same problems and seeds build the
same trees every time, so that run compiles every shape the timed ones meet and no rate counts
compilation. (A warm-up on fewer, other problems left the 64-tree batch shapes to compile inside the
timed lockstep run: with a cold compilation cache it reported a speed-up of 1.12 where the same run with
the cache warm gave 1.36.) Then `repeats` rounds each time every side once, in an order that rotates
from round to round, so that a machine whose speed drifts between minutes slows both sides alike: the
seconds are medians over the rounds (a rate is the nodes over them), and `speedup` is the median of the rounds' own ratios
(`speedup_per_round` lists them). `variants` adds other lockstep backends (the same search with other
settings, e.g. row buckets) to every round; each reports its median rate and the median of its per-round
ratio to the lockstep side (`vs_batched`), an A/B measured side by side in one process.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alphallm_jax.sampling import SampleRequest
from alphallm_jax.search.mcts import run_mcts
from alphallm_jax.search.tree import SearchProblem, Tree


def unique_tokens(trees: Sequence[Tree], prompt_tokens: dict[str, int]) -> int:
    """Each tree's prompt once plus the tokens of every option in it."""
    return sum(prompt_tokens[t.problem.problem_id] + sum(len(n.option_token_ids) for n in t.nodes[1:])
               for t in trees)


def tree_nodes(trees: Sequence[Tree]) -> int:
    return sum(len(t.nodes) - 1 for t in trees)


def _samplers(backend) -> dict[str, Any]:
    """The backend's samplers by role: the policy's, and the fast-rollout policy's when it is another."""
    samplers = {"policy": backend.sampler}
    if backend.rollout_sampler is not backend.sampler:
        samplers["rollout"] = backend.rollout_sampler
    return samplers


def _timed_search(make_backend, problems: Sequence[SearchProblem], mcts_cfg, *, one_at_a_time: bool):
    backend = make_backend()
    samplers = _samplers(backend)
    before = {k: dataclasses.replace(s.stats) for k, s in samplers.items()}
    start = time.perf_counter()
    if one_at_a_time:
        trees = [tree for p in problems for tree in run_mcts([p], backend, mcts_cfg)]
    else:
        trees = run_mcts(problems, backend, mcts_cfg)
    seconds = time.perf_counter() - start
    rows_per_round = {k: (s.stats.batch_rows - before[k].batch_rows) / max(1, s.stats.batches - before[k].batches)
                      for k, s in samplers.items()}
    prefilled = backend.sampler.stats.prefilled_tokens - before["policy"].prefilled_tokens
    return trees, seconds, prefilled, rows_per_round


def decode_row_cost(sampler, prompt_ids: Sequence[Sequence[int]], rows: int, *, new_tokens: int = 32,
                    temperature: float = 1.0, repeats: int = 3, attempts: int = 3) -> float:
    """Seconds per row and decoded token when `rows` requests (prompts taken in turn from `prompt_ids`)
    decode together: a call for up to `new_tokens` tokens less one for a single token (the same
    prefill), over the tokens the first generated beyond the second's. Each call's time is its fastest
    of `repeats` (the two alternate): a shared machine's noise only adds time, and the difference of
    single timings of a small model could come out at zero or below. One untimed round first (compiles).
    A difference at or below zero (a busy machine's noise larger than the decoding it brackets) is measured
    again with twice the new tokens (as far as the sampler's `max_len` allows) and two more repeats, up to
    `attempts` measurements in all."""
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(rows)]
    room = sampler.max_len - max(len(p) for p in prompts)
    if room < 2:
        raise ValueError(f"the sampler's max_len {sampler.max_len} leaves no room to decode after the prompts")

    def timed(max_new: int) -> tuple[float, int]:
        requests = [SampleRequest(state=sampler.new_state(p), max_new_tokens=max_new, temperature=temperature,
                                  seed=i) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        out = sampler.sample(requests, keep_states=False)
        return time.perf_counter() - start, sum(len(c.token_ids) for c in out)

    for _ in range(attempts):
        new_tokens = min(new_tokens, room)
        timed(new_tokens), timed(1)
        rounds = [(timed(new_tokens), timed(1)) for _ in range(repeats)]
        (_, long_tokens), (_, short_tokens) = rounds[0]
        extra_s = min(long_s for (long_s, _), _ in rounds) - min(short_s for _, (short_s, _) in rounds)
        if extra_s > 0:
            return extra_s / max(1, long_tokens - short_tokens)
        new_tokens, repeats = 2 * new_tokens, repeats + 2
    raise RuntimeError(f"decoding {long_tokens - short_tokens} more tokens at {rows} rows took no measurable "
                       f"time beyond one token's call in {attempts} measurements; raise new_tokens or repeats")


def run_search_bench(make_backend, problems: Sequence[SearchProblem], mcts_cfg, prompt_tokens: dict[str, int], *,
                     sequential_problems: int, prompt_ids: Sequence[Sequence[int]] | None = None,
                     repeats: int = 3, variants: Mapping[str, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """`make_backend()` gives a fresh backend over the same models; see the module doc. `prompt_ids`
    (token ids of some of the problems' prompts) enables the `decode_row_cost` measurement; `variants`
    maps a name to another backend maker whose lockstep search joins every round."""
    if len(problems) < 1 or sequential_problems < 1:
        raise ValueError("need at least one problem on each side")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    variants = dict(variants or {})
    if {"batched", "sequential"} & set(variants):
        raise ValueError("a variant cannot be named 'batched' or 'sequential'")
    seq_set = problems[:sequential_problems]
    # side -> (backend maker, problems, one tree at a time)
    sides = {"batched": (make_backend, problems, False), "sequential": (make_backend, seq_set, True),
             **{name: (maker, problems, False) for name, maker in variants.items()}}
    warm = {name: _timed_search(maker, work, mcts_cfg, one_at_a_time=one)  # compiles every shape
            for name, (maker, work, one) in sides.items()}
    runs: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            maker, work, one = sides[name]
            run = _timed_search(maker, work, mcts_cfg, one_at_a_time=one)
            if name in ("batched", "sequential") and (
                    [t.to_records() for t in run[0]] != [t.to_records() for t in warm[name][0]]):
                raise RuntimeError(f"the {name} search built other trees on a timed run than on its first")
            runs[name].append(run)

    def rates(name):
        return [tree_nodes(trees) / seconds for trees, seconds, _, _ in runs[name]]

    def median_seconds(name):
        return statistics.median(seconds for _, seconds, _, _ in runs[name])

    batched, _, prefilled, batched_rows = runs["batched"][0]
    sequential, _, _, sequential_rows = runs["sequential"][0]
    per_round = [b / q for b, q in zip(rates("batched"), rates("sequential"))]
    unique = unique_tokens(batched, prompt_tokens)
    result = {
        "batched_nodes_per_s": tree_nodes(batched) / median_seconds("batched"),
        "sequential_nodes_per_s": tree_nodes(sequential) / median_seconds("sequential"),
        "speedup": statistics.median(per_round), "speedup_per_round": per_round,
        "prefill_to_unique_tokens": prefilled / unique,
        "batched": {"problems": len(problems), "nodes": tree_nodes(batched), "seconds": median_seconds("batched"),
                    "seconds_per_round": [run[1] for run in runs["batched"]],
                    "prefilled_tokens": prefilled, "unique_tokens": unique, "rows_per_round": batched_rows},
        "sequential": {"problems": len(seq_set), "nodes": tree_nodes(sequential),
                       "seconds": median_seconds("sequential"),
                       "seconds_per_round": [run[1] for run in runs["sequential"]],
                       "rows_per_round": sequential_rows},
        "timed_runs": f"{repeats} rounds after an untimed one (it compiles); medians",
    }
    if variants:
        result["variants"] = {name: {
            "nodes": tree_nodes(runs[name][0][0]), "nodes_per_s": tree_nodes(runs[name][0][0]) / median_seconds(name),
            "seconds": median_seconds(name), "seconds_per_round": [run[1] for run in runs[name]],
            "rows_per_round": runs[name][0][3],
            "vs_batched": statistics.median(v / b for v, b in zip(rates(name), rates("batched")))}
            for name in variants}
    if prompt_ids:
        costs = {}
        for role, sampler in _samplers(make_backend()).items():
            rows = {"sequential": max(1, round(sequential_rows[role])), "batched": max(1, round(batched_rows[role]))}
            seconds = {mode: decode_row_cost(sampler, prompt_ids, n) for mode, n in rows.items()}
            costs[role] = {"rows": rows, "us_per_row_token": {m: 1e6 * t for m, t in seconds.items()},
                           "decode_batching_gain": seconds["sequential"] / seconds["batched"]}
        result["decode_row_cost"] = costs
    return result
