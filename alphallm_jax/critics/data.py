"""Critic training data from the policy's own rollouts on labelled D0 (the only place labels are used).

Per prompt, `num_solutions` trajectories are sampled one step (option) at a time, so every prefix
state s_k (k steps written) is a `SeqState` kept in the sampler's KV pool. Every distinct intermediate
state gets at least `num_rollouts` Monte-Carlo outcomes: the continuations of the trajectories that
pass through it, topped up with completions sampled from it (the samples of one state share one
prefill of its pending token and are forked on device, so no prefix is recomputed). Every completion
is graded against the reference answer.

Labels, pooled per distinct state (identical prefixes of one prompt share their statistics):
  * `state_hits[k] / state_counts[k]`: the MC value of s_k, over the rollouts from s_k and the
    continuations of every trajectory through s_k (the root's are the trajectories themselves; a
    terminal state's is its own outcome);
  * the soft PRM label of step k is that same fraction (the chance that the policy reaches the right
    answer after step k); the hard one is whether any of those outcomes was correct;
  * ORM: the graded outcome of every complete trajectory, and of every rollout when `keep_rollouts`.
Every row also keeps `step_logprobs`, each step's summed token log-probability under the (untempered)
policy, as the sampler returned it: the outcome combiner's confidence feature.

Artifacts (`out_dir`): `parts/chunk_NNNNN.jsonl` (one per `prompts_per_chunk` prompts, written
atomically, skipped on a rerun), then `rows.jsonl`, `stats.json` and `DONE`. `config.json` records
what the rows were built with; resuming with different settings is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from alphallm_jax.critics.losses import PAIR_PREFIX
from alphallm_jax.critics.positions import orm_index, strip_trailing
from alphallm_jax.data.grading import is_correct
from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import step_separator
from alphallm_jax.sampling import Sampler, SampleRequest, SeqState
from alphallm_jax.search.options import option_end, solution_end_stops
from alphallm_jax.train.batching import drop_overlong
from alphallm_jax.utils.distributed import (
    barrier,
    broadcast_int,
    coordinator_flags,
    is_coordinator,
    this_process_share,
    writes_results,
)
from alphallm_jax.utils.io import (
    PathLike,
    as_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    write_jsonl_atomic,
)

log = logging.getLogger(__name__)
DONE = "DONE"
PRM_LABELS = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the policy's rollouts are sampled (fields of the `critics.data` config section)."""

    num_solutions: int = 8  # N trajectories per prompt
    num_rollouts: int = 4  # M: outcomes per distinct intermediate state (trajectories through it + rollouts)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 160  # per solution, all steps together
    max_step_tokens: int = 64  # per step
    max_steps: int = 12
    solution_stop: tuple[str, ...] = ("\n\n", "\nQuestion:")  # where a rollout to the end stops
    prompts_per_chunk: int = 16
    keep_rollouts: bool = True  # rollouts become ORM-only training rows
    pool_slots: int = 1024  # the data sampler's KV pool

    def __post_init__(self):
        object.__setattr__(self, "solution_stop", tuple(self.solution_stop))
        if self.num_solutions < 1 or self.num_rollouts < 0 or self.max_steps < 1:
            raise ValueError(f"invalid critics.data settings: {self}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | Any) -> RolloutConfig:
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown critics.data fields: {sorted(unknown)}")
        return cls(**d)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclasses.dataclass
class _Trajectory:
    problem_index: int
    state: SeqState
    step_ids: list[list[int]] = dataclasses.field(default_factory=list)
    step_texts: list[str] = dataclasses.field(default_factory=list)
    step_logprobs: list[float] = dataclasses.field(default_factory=list)  # summed over each step's tokens
    keys: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # s_0 .. s_k
    generated: int = 0  # tokens sampled so far (the solution budget)
    done: bool = False
    complete: bool = False
    correct: bool = False

    @property
    def text(self) -> str:
        return "".join(self.step_texts)


class _Stats:
    """Outcome counts per distinct state key."""

    def __init__(self):
        self.hits: dict[tuple[int, ...], int] = {}
        self.counts: dict[tuple[int, ...], int] = {}

    def add(self, key: tuple[int, ...], correct: bool) -> None:
        self.hits[key] = self.hits.get(key, 0) + int(correct)
        self.counts[key] = self.counts.get(key, 0) + 1


def trajectory_stops(cfg: RolloutConfig, task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(stops of a step, stops of a rollout to the end): the search's (`search.options`), so that a
    trajectory's steps and ends are the options and solutions its search would make."""
    separator = step_separator(task)
    end_stops = solution_end_stops(cfg.solution_stop, separator)
    return (separator, *end_stops), end_stops


def rollout_chunk(sampler: Sampler, problems: Sequence[Problem], prompts: Sequence[str], cfg: RolloutConfig, *,
                  task: str, eos_ids: Collection[int], seed: int, chunk_index: int = 0) -> tuple[list[dict], dict]:
    """Trajectories and MC rollouts for a few prompts; returns (rows, counters).

    Every sample ends where the search's would (`search.options.option_end`): after the final answer's
    line, at an end stop, at a blank step or EOS; a step cut by `max_step_tokens` is an ordinary step.
    Text past the end is cut off with its tokens."""
    step_stops, end_stops = trajectory_stops(cfg, task)
    eos = frozenset(int(e) for e in eos_ids)
    roots = [sampler.new_state(p) for p in prompts]
    trajs = [_Trajectory(i, roots[i], keys=[tuple(roots[i].tokens)])
             for i in range(len(problems)) for _ in range(cfg.num_solutions)]
    stats = _Stats()
    rows: list[dict] = []
    counters = {"trajectories": len(trajs), "rollouts": 0, "rollout_tokens": 0, "step_tokens": 0}

    def grade(i: int, text: str) -> bool:
        return is_correct(text, problems[i].answer, task)

    def ending(prefix: str, context: Sequence[int], c) -> tuple[list[int], str, list[float], bool]:
        """The sample `c` (after `prefix`, whose tokens end with `context`) cut where it ends: its tokens
        (no EOS), text, their log-probabilities, and whether it ends the solution."""
        end = option_end(prefix, c.text, task=task, finish_reason=c.finish_reason, stop_string=c.stop_string,
                         end_stops=end_stops)
        ids, text = list(c.token_ids), c.text
        if end.keep_chars < len(text):
            ids, text = sampler.cut(context, ids, end.keep_chars)
        ids = strip_trailing(ids, eos)
        return ids, text, list(c.logprobs[:len(ids)]), end.ends_solution

    for level in range(cfg.max_steps):
        active = [t for t in trajs if not t.done]
        if not active:
            break
        # The last step allowed runs to the end of the solution, as the search rolls out a node at its
        # maximum depth: cut there and graded unfinished, a trajectory's outcome (pooled into its states'
        # labels) would follow another policy than its states' rollouts, which run to the end.
        last = level == cfg.max_steps - 1
        requests = [SampleRequest(state=t.state, max_new_tokens=(cfg.max_new_tokens - t.generated if last else
                                                                 min(cfg.max_step_tokens, cfg.max_new_tokens - t.generated)),
                                  temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                  stop=end_stops if last else step_stops, seed=_seed(seed, chunk_index, n, level, 0),
                                  stop_context=t.text, context_stops=end_stops)
                    for n, t in enumerate(active)]
        for t, c in zip(active, sampler.sample(requests, keep_states=True)):
            ids, text, logprobs, ends = ending(t.text, t.state.tokens, c)
            t.step_ids.append(ids)
            t.step_texts.append(text)
            t.step_logprobs.append(float(np.sum(logprobs)))
            t.state = c.state  # a cut sample ends the trajectory: its state is never continued
            t.generated += len(c.token_ids)
            t.keys.append(t.keys[-1] + tuple(ids))
            counters["step_tokens"] += len(c.token_ids)
            if ends or len(t.step_ids) >= cfg.max_steps or t.generated >= cfg.max_new_tokens:
                t.done = True
                t.complete = ends
                t.correct = grade(t.problem_index, t.text)

        # MC rollouts from every distinct new intermediate state (one prefill each, forked): M outcomes
        # minus the trajectories that continue from it (each of those is one outcome already).
        fresh: dict[tuple[int, ...], _Trajectory] = {}
        through: dict[tuple[int, ...], int] = {}
        for t in active:
            if not t.done and t.keys[-1] not in stats.counts:
                fresh.setdefault(t.keys[-1], t)
                through[t.keys[-1]] = through.get(t.keys[-1], 0) + 1
        requests, sources = [], []
        for key, t in fresh.items():
            budget = cfg.max_new_tokens - t.generated
            for m in range(max(0, cfg.num_rollouts - through[key]) if budget > 0 else 0):
                requests.append(SampleRequest(
                    state=t.state, max_new_tokens=budget, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, stop=end_stops, seed=_seed(seed, chunk_index, len(sources), level, 1),
                    stop_context=t.text, context_stops=end_stops))
                sources.append((key, t, m))
        for (key, t, _), c in zip(sources, sampler.sample(requests, keep_states=False)):
            last, text, logprobs, ends = ending(t.text, t.state.tokens, c)
            correct = grade(t.problem_index, t.text + text)
            stats.add(key, correct)
            counters["rollouts"] += 1
            counters["rollout_tokens"] += len(c.token_ids)
            if cfg.keep_rollouts:
                rows.append({
                    "problem_id": problems[t.problem_index].id, "kind": "rollout",
                    "prompt_ids": list(roots[t.problem_index].tokens),
                    "step_ids": [list(s) for s in t.step_ids] + [last],
                    "step_logprobs": t.step_logprobs + [float(np.sum(logprobs))],
                    "text": t.text + text, "from_step": len(t.step_ids), "complete": ends, "correct": bool(correct)})
        for key in fresh:
            stats.counts.setdefault(key, 0)
            stats.hits.setdefault(key, 0)

    for t in trajs:  # each trajectory's own continuation is one more outcome for each of its states
        for key in dict.fromkeys(t.keys):  # once each: a step of only EOS repeats the previous state
            stats.add(key, t.correct)
    for t in trajs:
        rows.append({
            "problem_id": problems[t.problem_index].id, "kind": "trajectory",
            "prompt_ids": list(roots[t.problem_index].tokens), "step_ids": [list(s) for s in t.step_ids],
            "step_logprobs": t.step_logprobs, "text": t.text, "complete": t.complete,
            "correct": bool(t.correct),
            "state_hits": [stats.hits[k] for k in t.keys], "state_counts": [stats.counts[k] for k in t.keys]})
    return rows, counters


def _fingerprint(problems: Sequence[Problem], prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p, prompt in zip(problems, prompts):
        h.update(f"{p.id}\x00{p.answer}\x00{prompt}\x01".encode())
    return h.hexdigest()[:16]


def build_rollout_data(sampler: Sampler, problems: Sequence[Problem], prompt_for: Callable[[Problem], str],
                       cfg: RolloutConfig, out_dir: PathLike, *, task: str, seed: int = 0,
                       desc: str = "critic data") -> list[dict]:
    """Builds (or resumes, or reads back) the rows for `problems` under `out_dir`; returns them."""
    out = as_path(out_dir)
    if not problems:
        raise ValueError(f"{desc}: no problems to roll out")
    prompts = [prompt_for(p) for p in problems]
    record = {"rollout": dataclasses.asdict(cfg), "task": task, "seed": seed, "num_problems": len(problems),
              "problems": _fingerprint(problems, prompts)}
    record["rollout"]["solution_stop"] = list(cfg.solution_stop)
    record["stops"] = [list(stops) for stops in trajectory_stops(cfg, task)]  # as the rows were cut
    # How samples end, as this code cuts them: end stops may begin in the solution so far, and the last
    # allowed step runs to the end (data built before either is refused, not mixed with new chunks).
    record["samples"] = {"end_stops_from_context": True, "last_step_to_end": True}
    del record["rollout"]["pool_slots"]  # a cache size: it does not change the rows
    config_path = out / "config.json"
    if config_path.exists():
        old = read_json(config_path)
        if old != record:
            raise ValueError(f"{out} holds critic data built with other settings ({config_path}); "
                             "delete that directory or restore the settings to resume")
    elif is_coordinator():
        atomic_write_json(config_path, record)
    if broadcast_int((out / DONE).exists()):  # finished, with these settings (checked above)
        return read_jsonl(out / "rows.jsonl")
    eos_ids = set(sampler.cfg.eos_token_ids) | set(sampler.tokenizer.eos_ids if sampler.tokenizer else ())
    size = cfg.prompts_per_chunk
    num_chunks = -(-len(problems) // size)
    start = time.time()
    totals: dict[str, int] = {}
    # Multi-host: chunk i belongs to process i % process_count (rows depend on the chunk's own seed only);
    # on a mesh spanning processes every process rolls out every chunk, process 0 writes them.
    mesh = getattr(sampler, "mesh", None)
    my_chunks = this_process_share(list(range(num_chunks)), mesh)
    my_problems = sum(min(len(problems), (ci + 1) * size) - ci * size for ci in my_chunks)
    parts = [out / "parts" / f"chunk_{ci:05d}.jsonl" for ci in my_chunks]
    finished = coordinator_flags([p.exists() for p in parts], mesh)
    with tqdm(total=my_problems, desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for ci, part, skip in zip(my_chunks, parts, finished):
            lo, hi = ci * size, min(len(problems), (ci + 1) * size)
            if not skip:
                rows, counters = rollout_chunk(sampler, problems[lo:hi], prompts[lo:hi], cfg, task=task,
                                               eos_ids=eos_ids, seed=seed, chunk_index=ci)
                if writes_results(mesh):
                    write_jsonl_atomic(part, rows)
                for k, v in counters.items():
                    totals[k] = totals.get(k, 0) + v
            bar.update(hi - lo)
    barrier(f"critic-data:{out}:parts")
    rows = []
    for ci in range(num_chunks):
        rows += read_jsonl(out / "parts" / f"chunk_{ci:05d}.jsonl")
    if is_coordinator():
        write_jsonl_atomic(out / "rows.jsonl", rows)
        trajs = [r for r in rows if r["kind"] == "trajectory"]
        atomic_write_json(out / "stats.json", {
            "problems": len(problems), "trajectory_rows": len(trajs), "rollout_rows": len(rows) - len(trajs),
            "trajectory_accuracy": float(np.mean([r["correct"] for r in trajs])) if trajs else None,
            "wall_seconds_this_run": time.time() - start, "this_run": totals,
            "sampler": sampler.stats.as_dict()})  # process 0's counters
        atomic_write_text(out / DONE, "ok\n")
    barrier(f"critic-data:{out}:done")
    return rows


# --------------------------------------------------------------------------- training examples


def trajectory_read_points(row: Mapping[str, Any]) -> tuple[list[int], int]:
    """(end index of each state s_0 .. s_K in the row's token sequence, total length)."""
    ends = [len(row["prompt_ids"]) - 1]
    for step in row["step_ids"]:
        ends.append(ends[-1] + len(step))
    return ends, ends[-1] + 1


def row_solution_ids(row: Mapping[str, Any]) -> list[int]:
    return [t for step in row["step_ids"] for t in step]


def row_tokens(row: Mapping[str, Any]) -> list[int]:
    return list(row["prompt_ids"]) + row_solution_ids(row)


def critic_example(row: Mapping[str, Any], *, blank_ids: Collection[int], prm_label: str = "soft",
                   value_at_root: bool = True) -> dict[str, np.ndarray]:
    """One training example: tokens, positions and per-position targets and masks of the three heads."""
    if prm_label not in PRM_LABELS:
        raise ValueError(f"critics.prm_label={prm_label!r}; choose from {PRM_LABELS}")
    ids = np.asarray(row_tokens(row), np.int32)
    n = ids.size
    ex = {"input_ids": ids, "positions": np.arange(n, dtype=np.int32)}
    for head in ("value", "prm", "orm"):
        ex[f"{head}_target"] = np.zeros(n, np.float32)
        ex[f"{head}_mask"] = np.zeros(n, np.float32)
    if row["kind"] == "trajectory":
        ends, _ = trajectory_read_points(row)
        hits, counts = row["state_hits"], row["state_counts"]
        for k, end in enumerate(ends):
            v = hits[k] / max(counts[k], 1)
            if k > 0 or value_at_root:
                ex["value_target"][end], ex["value_mask"][end] = v, 1.0
            if k > 0 and len(row["step_ids"][k - 1]):
                ex["prm_target"][end] = v if prm_label == "soft" else float(hits[k] > 0)
                ex["prm_mask"][end] = 1.0
    o = orm_index(ids.tolist(), blank_ids)
    ex["orm_target"][o], ex["orm_mask"][o] = float(row["correct"]), 1.0
    return ex


def critic_examples(rows: Sequence[Mapping[str, Any]], *, blank_ids: Collection[int], prm_label: str = "soft",
                    value_at_root: bool = True, max_seq_len: int | None = None,
                    kinds: Collection[str] = ("trajectory", "rollout"), pairs: bool = False,
                    seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Training examples from data rows (rows longer than `max_seq_len` are dropped, with a warning);
    with `pairs`, two solutions of one prompt per example (`pair_within_prompts`)."""
    rows = drop_overlong([r for r in rows if r["kind"] in kinds], max_seq_len, "critic rows",
                         lambda r: len(r["prompt_ids"]) + sum(len(s) for s in r["step_ids"]))
    out = [critic_example(r, blank_ids=blank_ids, prm_label=prm_label, value_at_root=value_at_root) for r in rows]
    return pair_within_prompts(out, [r["problem_id"] for r in rows], seed=seed) if pairs else out


def pair_within_prompts(examples: Sequence[dict[str, np.ndarray]], problem_ids: Sequence[str], *,
                        seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Examples holding two solutions of the same prompt (the second's keys prefixed `b_`), so the loss
    can rank them (`critics.losses`: the ORM of the right one above the wrong one's). Per prompt, right
    and wrong solutions are paired first, then the rest among themselves; an odd one out is paired with
    a label-free copy of itself. Every solution appears exactly once."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(problem_ids):
        groups.setdefault(pid, []).append(i)
    out = []
    for pid in sorted(groups):
        idx = [int(i) for i in rng.permutation(groups[pid])]
        is_right = {i: np.sum(examples[i]["orm_target"] * examples[i]["orm_mask"]) > 0.5 for i in idx}
        right = [i for i in idx if is_right[i]]
        wrong = [i for i in idx if not is_right[i]]
        n = min(len(right), len(wrong))
        pairs = list(zip(right[:n], wrong[:n]))
        rest = right[n:] + wrong[n:]
        pairs += list(zip(rest[0::2], rest[1::2]))
        if len(rest) % 2:
            pairs.append((rest[-1], None))
        for a, b in pairs:
            second = examples[a if b is None else b]
            if b is None:  # no partner: the copy carries no label
                second = {k: (np.zeros_like(v) if k.endswith("_mask") else v) for k, v in second.items()}
            out.append({**examples[a], **{PAIR_PREFIX + k: v for k, v in second.items()}})
    return out
