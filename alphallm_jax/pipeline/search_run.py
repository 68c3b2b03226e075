"""Searching problems with the policy and the critics: settings, the LM backend, and `alphallm search`.

`alphallm search --config CONFIG --workdir DIR` searches a split (`search.split`, default `eval.split`) or a
JSONL file of prompts (`search.prompts_file`) with eta-MCTS (or the beam baseline, `search.method=beam`)
and writes, under DIR/search:
  trees/<problem id>.jsonl   one tree per problem, written atomically as soon as it is finished
                             (a rerun skips every chunk of `search.problems_per_call` problems whose
                             tree files are complete, and searches a started chunk again whole);
  summary.json               accuracy (when the problems have reference answers), nodes, generated tokens
                             and simulations per question, backend and sampler counters, wall time;
  config.json                the config of the latest run.
The self-improvement loop calls `make_backend` + `search_to_dir` on its synthesized prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm import tqdm

from alphallm_jax.data.grading import is_correct
from alphallm_jax.data.problems import Problem
from alphallm_jax.search.baselines import BeamSearchConfig, beam_search
from alphallm_jax.search.lm_backend import LMSearchBackend
from alphallm_jax.search.mcts import run_mcts
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.options import OptionConfig
from alphallm_jax.search.tree import SearchProblem, Tree, problem_seed, write_tree
from alphallm_jax.utils.distributed import (
    barrier,
    coordinator_flags,
    is_coordinator,
    spans_processes,
    sum_over_processes,
    this_process_share,
    writes_results,
)
from alphallm_jax.utils.io import DataFormatError, as_path, atomic_write_json, iter_jsonl

log = logging.getLogger(__name__)
METHODS = ("mcts", "beam")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The `search` config section as typed configs."""

    mcts: MCTSConfig = MCTSConfig()
    beam: BeamSearchConfig = BeamSearchConfig()
    options: OptionConfig = OptionConfig()

    @classmethod
    def from_config(cls, cfg) -> SearchSettings:
        s = cfg.search
        return cls(mcts=mcts_config_from(s.mcts), beam=BeamSearchConfig.from_config(s.beam),
                   options=OptionConfig.from_config(s.options))

    def to_dict(self) -> dict[str, Any]:
        return {"mcts": self.mcts.to_dict(), "beam": self.beam.to_dict(), "options": self.options.to_dict()}


_WARNED_NARROW: set[MCTSConfig] = set()


def mcts_config_from(section) -> MCTSConfig:
    """MCTSConfig from `search.mcts`: the named preset, overridden by every field that is not None."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    mcts = MCTSConfig.from_config({k: v for k, v in d.items() if v is not None and (k != "preset" or v)})
    if mcts.alpha > 0 and not mcts.widens and mcts not in _WARNED_NARROW:
        _WARNED_NARROW.add(mcts)  # once per config: settings are read in every stage
        log.warning("search.mcts.alpha=%g never widens a node: I(s) is a difference of value-head probabilities, "
                    "at most 1, so floor(alpha * I(s)) + 1 <= %d <= c_min(t) at every depth (c_min %d / %d); "
                    "importance-weighted expansion acts from alpha > c_min(t) - 1 (the paper presets use 10)",
                    mcts.alpha, math.floor(mcts.alpha + 1e-9) + 1, mcts.c_min0, mcts.c_min)
    return mcts


# ------------------------------------------------------------------------------------ components


def critic_dir(cfg, workdir):
    """`search.critics`, else `critics.checkpoint`, else WORKDIR/critics/critic (`alphallm train-critics`)."""
    return as_path(cfg.search.critics or cfg.critics.checkpoint or as_path(workdir) / "critics" / "critic")


def critic_settings(cfg) -> dict[str, Any]:
    """The config that shapes a loaded critic's scores besides its files (a run's identity holds both): the
    tool checks, how step scores aggregate into a PRM score, and whether the outcome combiner is used."""
    return {"tools": cfg.critics.tools.to_dict(), "prm_aggregate": cfg.critics.scoring.prm_aggregate,
            "combiner": bool(cfg.critics.combiner.enabled)}


def load_critic_scorer(cfg, workdir, tokenizer, *, mesh=None):
    """The trained critic as a `CriticScorer` configured by `critics.scoring` and `critics.tools`."""
    from alphallm_jax.critics.pipeline import load_combiner, make_scorer
    from alphallm_jax.models.critic import load_critic

    path = critic_dir(cfg, workdir)
    return make_scorer(cfg, load_critic(path, mesh=mesh), tokenizer, mesh=mesh, combiner=load_combiner(cfg, path))


def search_max_len(cfg, tokenizer, prompts: Sequence[str], options: OptionConfig, limit: int) -> int:
    """`search.max_len`, else the longest prompt plus a whole solution; at most `limit` (the models' context)."""
    if cfg.search.max_len:
        return min(cfg.search.max_len, limit)
    longest = max((len(tokenizer.encode(p, add_bos=True)) for p in prompts), default=1)
    return min(longest + options.max_solution_tokens, limit)


def rolls_out_with_fast_policy(cfg, methods: Sequence[str], settings: SearchSettings | None = None) -> bool:
    """Whether searching by any of `methods` (eval specs like "mcts@16" or search methods) samples rollouts
    from the fast-rollout policy: only `mcts` rolls out (`mcts_lean` and `beam` score nodes by the critic
    alone), only with `num_rollouts` > 0 (the preset's where the config sets none), and only with
    `search.rollout_policy` and `rollout_policy.enabled` (else the policy rolls out itself)."""
    names = {spec.partition("@")[0] for spec in methods}
    if "mcts" not in names or not (cfg.search.rollout_policy and cfg.rollout_policy.enabled):
        return False
    return (settings or SearchSettings.from_config(cfg)).mcts.num_rollouts > 0


def rollout_identity(cfg, workdir, methods: Sequence[str], settings: SearchSettings | None = None) -> dict:
    """What a search's rollouts come from, for a run's identity: the fast-rollout policy's files, or the
    policy itself (`rolls_out_with_fast_policy` off) where `methods` roll out at all; {} where none does.
    Recording the second case too keeps a switch between them from resuming past results."""
    settings = settings or SearchSettings.from_config(cfg)
    names = {spec.partition("@")[0] for spec in methods}
    if "mcts" not in names or settings.mcts.num_rollouts <= 0:
        return {}
    if not rolls_out_with_fast_policy(cfg, methods, settings):
        return {"rollout_policy": "the policy itself"}
    from alphallm_jax.critics.fast_rollout import fast_policy_dir
    from alphallm_jax.utils.io import files_fingerprint

    return {"rollout_policy": files_fingerprint(fast_policy_dir(cfg, workdir))}


def make_backend(cfg, workdir, model, tokenizer, prompts: Sequence[str], *, scorer=None, mesh=None,
                 settings: SearchSettings | None = None, fast_policy=None,
                 methods: Sequence[str] = ("mcts",)) -> LMSearchBackend:
    """The LM backend for `prompts`: a search sampler over `model` (its own KV pool of `search.pool_slots`),
    the critic (loaded when `scorer` is None) and, when searching by `methods` rolls out with it
    (`rolls_out_with_fast_policy`), the fast-rollout policy (`fast_policy`: its (model, tokenizer) already
    loaded; None: loaded here)."""
    from alphallm_jax.sampling import sampler_from_config

    settings = settings or SearchSettings.from_config(cfg)
    scorer = scorer if scorer is not None else load_critic_scorer(cfg, workdir, tokenizer, mesh=mesh)
    limit = min(model.cfg.max_position_embeddings, scorer.max_len)
    max_len = search_max_len(cfg, tokenizer, prompts, settings.options, limit)
    max_batch = cfg.search.max_batch or cfg.sampling.max_batch
    sampler = sampler_from_config(cfg, model, tokenizer, max_len=max_len, pool_slots=cfg.search.pool_slots,
                                  max_batch=max_batch, mesh=mesh)
    rollout_sampler = None
    if rolls_out_with_fast_policy(cfg, methods, settings):
        from alphallm_jax.critics.fast_rollout import load_fast_rollout_policy

        fast, fast_tokenizer = fast_policy or load_fast_rollout_policy(cfg, workdir, mesh=mesh)
        rollout_sampler = sampler_from_config(cfg, fast, fast_tokenizer, pool_slots=2, max_batch=max_batch,
                                              max_len=min(max_len, fast.cfg.max_position_embeddings), mesh=mesh)
    return LMSearchBackend(sampler, scorer, task=cfg.task, options=settings.options, rollout_sampler=rollout_sampler)


# -------------------------------------------------------------------------------------- problems


def search_problem(problem: Problem, prompt: str, seed: int) -> SearchProblem:
    return SearchProblem(problem_id=problem.id, prompt=prompt, question=problem.question,
                         reference=problem.answer or None, task=problem.task, seed=problem_seed(seed, problem.id))


def read_prompts_file(path, task: str, prompt_for: Callable[[Problem], str], seed: int) -> list[SearchProblem]:
    """Problems from JSONL rows `{"question": ...}` (formatted like every prompt) or `{"prompt": ...}`
    (used verbatim), with an optional `id` (default: `prompt-<line>`) and reference `answer`."""
    problems, seen = [], set()
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("question", row.get("prompt")), str):
            raise DataFormatError(str(path), line, 'a prompt row needs a "question" or a "prompt" string')
        pid = str(row.get("id", f"prompt-{line:05d}"))
        if pid in seen:
            raise DataFormatError(str(path), line, f"duplicate id {pid!r}")
        seen.add(pid)
        answer = row.get("answer")
        problem = Problem(id=pid, question=row.get("question", ""), answer="" if answer is None else str(answer),
                          solution=None, task=task)
        prompt = row["prompt"] if isinstance(row.get("prompt"), str) else prompt_for(problem)
        problems.append(search_problem(problem, prompt, seed))
    return problems


def load_search_problems(cfg, prompt_for: Callable[[Problem], str]) -> list[SearchProblem]:
    """`search.prompts_file` when set, else the split `search.split` (default `eval.split`)."""
    from alphallm_jax.pipeline.evaluation import load_split

    if cfg.search.prompts_file:
        problems = read_prompts_file(cfg.search.prompts_file, cfg.task, prompt_for, cfg.seed)
        return problems[:cfg.search.limit] if cfg.search.limit else problems
    split = cfg.search.split or cfg.eval.split
    return [search_problem(p, prompt_for(p), cfg.seed) for p in load_split(cfg, split, cfg.search.limit)]


# ------------------------------------------------------------------------------------ searching


def tree_filename(problem_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", problem_id) + ".jsonl"


def _load_finished(path) -> Tree | None:
    """The tree at `path` when it is a complete tree file (a reader never sees a half-written one)."""
    if not path.exists():
        return None
    try:
        return Tree.load(path)
    except (DataFormatError, ValueError, KeyError) as e:
        log.warning("re-searching %s: unreadable tree file (%s)", path, e)
        return None


def _check_same_problem(tree: Tree, problem: SearchProblem, path) -> None:
    """A finished tree resumes only for the problem it searched: ids name problems by split and index (or
    a prompts file's line), so another generator, dataset or prompts file reuses them."""
    if (tree.problem.prompt, tree.problem.reference) != (problem.prompt, problem.reference):
        raise ValueError(f"{path} holds the tree of another problem under the id {problem.problem_id!r} (its "
                         f"prompt or reference differs: another dataset, generator or prompts file); use a "
                         f"new workdir, or remove {path.parent}")


def search_to_dir(problems: Sequence[SearchProblem], backend, settings: SearchSettings, trees_dir, *,
                  method: str = "mcts", problems_per_call: int = 256,
                  desc: str = "search") -> tuple[list[Tree], int]:
    """Search every problem whose tree is not yet under `trees_dir`, writing each tree as it finishes.
    Returns every problem's tree (loaded or searched) in problem order, and how many this call searched
    (a chunk holding an unfinished tree is searched whole, its finished trees again, so a resumed run
    may search more than it writes).

    Multi-host: each process searches its fixed share of the problems (`this_process_share`) on its own
    devices and writes those trees; after a barrier every process reads all of them. A tree's random
    draws depend only on its problem's seed, so the split changes none of them, though
    floats of batched kernels can differ in their last bits between splits (never between a killed and
    resumed run and an uninterrupted one: see the chunks below). On a mesh spanning processes every
    process searches every problem, each device call together, and process 0 writes the trees."""
    if method not in METHODS:
        raise ValueError(f"search method {method!r}; choose from {METHODS}")
    trees_dir = as_path(trees_dir)
    trees_dir.mkdir(parents=True, exist_ok=True)
    paths = {p.problem_id: trees_dir / tree_filename(p.problem_id) for p in problems}
    if len(set(paths.values())) != len(paths):
        raise ValueError("two problem ids map to the same tree file name; make the ids distinct")
    trees: dict[str, Tree] = {}
    mesh = getattr(getattr(backend, "sampler", None), "mesh", None)  # a synthetic backend samples nothing
    mine = this_process_share(list(problems), mesh)
    writes = writes_results(mesh)
    loaded = [_load_finished(paths[p.problem_id]) for p in mine]
    if spans_processes(mesh):
        # In lockstep every process skips the same trees: those process 0 could read. One it could not
        # (torn, or another format) is searched again by all; one only process 0 can read stops all.
        finished = coordinator_flags([t is not None for t in loaded], mesh)
        missing = sum(f and t is None for f, t in zip(finished, loaded))
        if sum_over_processes({"missing": missing})["missing"]:
            raise RuntimeError(f"{trees_dir}: trees process 0 finds finished are missing or unreadable on other "
                               "processes: processes sampling on one mesh need one shared workdir")
        loaded = [t if f else None for t, f in zip(loaded, finished)]
    for p, tree in zip(mine, loaded):
        if tree is not None:
            _check_same_problem(tree, p, paths[p.problem_id])
            trees[p.problem_id] = tree
    todo = [p for p in mine if p.problem_id not in trees]
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="problem") as bar:
        def done(tree: Tree) -> None:
            if tree.problem.problem_id in trees:  # finished before: recomputed with its chunk, not rewritten
                return
            if writes:
                write_tree(paths[tree.problem.problem_id], tree)
            trees[tree.problem.problem_id] = tree
            bar.update(1)

        # Lockstep trees share batched device calls, whose floats depend on the batch's shapes; a resumed
        # run searches the same fixed chunks of `mine` as an uninterrupted one (a chunk with any unfinished
        # tree is searched whole), so every tree comes out bit-identical.
        size = max(1, problems_per_call)
        searched = 0
        for start in range(0, len(mine), size):
            chunk = mine[start:start + size]
            if all(p.problem_id in trees for p in chunk):
                continue
            searched += len(chunk)
            if method == "mcts":
                run_mcts(chunk, backend, settings.mcts, on_tree_done=done)
            else:
                for tree in beam_search(chunk, backend, settings.beam):
                    done(tree)
    if jax.process_count() > 1:
        barrier(f"search:{trees_dir}")
        for p in problems:
            if p.problem_id not in trees:
                tree = _load_finished(paths[p.problem_id])
                if tree is None:
                    raise RuntimeError(f"{paths[p.problem_id]}: no finished tree after every process searched "
                                       "its share; rerun to resume")
                trees[p.problem_id] = tree
    return [trees[p.problem_id] for p in problems], searched


def chosen_solution(tree: Tree) -> str:
    """The solution text of the path the search chose ("" when it chose none)."""
    return tree.chosen_text()


def summarize_trees(trees: Sequence[Tree]) -> dict[str, Any]:
    """Accuracy over the trees with a reference answer; nodes, tokens and simulations per question."""
    n = len(trees)
    graded = [t for t in trees if t.problem.reference]
    correct = sum(is_correct(chosen_solution(t), t.problem.reference, t.problem.task) for t in graded)

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / n if n else 0.0

    return {
        "num_problems": n,
        "graded": len(graded),
        "correct": correct,
        "accuracy": correct / len(graded) if graded else None,
        "answered": sum(t.answer is not None for t in trees),
        "mean_nodes": mean([len(t) - 1 for t in trees]),
        "mean_generated_tokens": mean([t.generated_tokens for t in trees]),
        "mean_simulations": mean([t.simulations for t in trees]),
        "mean_terminals": mean([len(t.terminals()) for t in trees]),
        "answer_methods": dict(Counter(t.answer_method for t in trees)),
    }


def run_search_from_config(cfg, workdir) -> dict[str, Any]:
    """`alphallm search`: load the policy, critics (and fast-rollout policy), search, write trees and a summary."""
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.models.loading import load_policy
    from alphallm_jax.pipeline.evaluation import prompt_builder

    if not cfg.model.checkpoint:
        raise ValueError("config key model.checkpoint is empty: set --config.model.checkpoint=DIR (the policy)")
    method = cfg.search.method
    if method not in METHODS:
        raise ValueError(f"search.method={method!r}; choose from {METHODS}")
    mesh = mesh_from_config(cfg)
    model, tokenizer = load_policy(cfg, cfg.model.checkpoint, mesh=mesh)
    problems = load_search_problems(cfg, prompt_builder(cfg, tokenizer))
    if not problems:
        raise ValueError("no problems to search (an empty split or prompts file)")
    settings = SearchSettings.from_config(cfg)
    out = as_path(workdir) / "search"
    # A rerun skips finished trees: only those of this same policy, critic and search (more problems may
    # follow). The fast-rollout policy goes in when this search rolls out with it.
    from alphallm_jax.utils.io import files_fingerprint
    from alphallm_jax.utils.run_identity import check_run_identity

    identity = {"policy": files_fingerprint(cfg.model.checkpoint), "critic": files_fingerprint(critic_dir(cfg, workdir)),
                "critic_settings": critic_settings(cfg), "method": method, "settings": settings.to_dict(), "seed": cfg.seed,
                **rollout_identity(cfg, workdir, (method,), settings)}
    check_run_identity(out, identity, resumable=())
    backend = make_backend(cfg, workdir, model, tokenizer, [p.prompt for p in problems], mesh=mesh,
                           settings=settings, methods=(method,))
    if is_coordinator():
        atomic_write_json(out / "config.json", cfg.to_dict())
    start = time.time()
    trees, searched = search_to_dir(problems, backend, settings, out / "trees", method=method,
                          problems_per_call=cfg.search.problems_per_call, desc=f"search {method}")
    wall = time.time() - start
    # The trees' figures cover every problem; the counters only this run's work (a resumed run's are its own).
    summary = {
        "method": method, **summarize_trees(trees), "searched_now": sum_over_processes({"n": searched}, mesh)["n"],
        "this_run": {"wall_seconds": round(wall, 2), "backend_stats": sum_over_processes(backend.stats.as_dict(), mesh),
                     "sampler_stats": sum_over_processes(backend.sampler.stats.as_dict(), mesh)},
        "settings": settings.to_dict(),
    }
    if is_coordinator():  # every process's counters, summed (in lockstep: the one shared run's)
        atomic_write_json(out / "summary.json", summary)
    return summary
