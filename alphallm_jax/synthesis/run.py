"""Synthesis from a config: D0, the task's evaluation splits and a sampler over the policy.

The loop calls `synthesize_from_config(cfg, policy_dir, d0_problems(cfg), stage_dir, seed=s,
previous=previous_prompts(earlier_dirs), id_prefix=f"syn{k}")` once per iteration with the current
policy; `alphallm synthesize` calls `run_synthesis` once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from alphallm_jax.data.problems import Problem
from alphallm_jax.synthesis.settings import SynthesisSettings
from alphallm_jax.synthesis.synthesize import SynthesisResult, load_synthesis, summary_line, synthesize

# Every evaluation split of a task: a synthesized prompt may overlap none of them.
EVAL_SPLITS = {
    "arith": ("arith:dev", "arith:test", "arith:test_hard"),
    "gsm8k": ("gsm8k:test",),
    "math": ("math:math500",),
}


def seed_split(cfg) -> tuple[str, int]:
    """D0: (split, how many of its first problems); defaults to the base policy's training set."""
    split = cfg.synthesis.seed_split or cfg.base.train_split
    limit = cfg.synthesis.num_seeds or (cfg.base.num_train if split == cfg.base.train_split else 0)
    return split, limit


def d0_problems(cfg) -> list[Problem]:
    """The seed questions D0 (`seed_split`)."""
    from alphallm_jax.pipeline.evaluation import load_split

    split, limit = seed_split(cfg)
    return load_split(cfg, split, limit)


def previous_prompts(out_dirs: Sequence) -> list[tuple[str, str]]:
    """(id, question) of the prompts kept by earlier syntheses (finished directories)."""
    out: list[tuple[str, str]] = []
    for d in out_dirs:
        done = load_synthesis(d)
        if done is None:
            raise FileNotFoundError(f"{d} holds no finished synthesis")
        out += [(p["id"], p["question"]) for p in done.prompts]
    return out


def test_splits(cfg) -> tuple[str, ...]:
    """`synthesis.test_splits`, else the task's evaluation splits plus `eval.split` when not among them."""
    if cfg.synthesis.test_splits:
        return tuple(cfg.synthesis.test_splits)
    splits = list(EVAL_SPLITS.get(cfg.task, ()))
    if cfg.eval.split and cfg.eval.split not in splits:
        splits.append(cfg.eval.split)
    return tuple(splits)


def iteration_seed(cfg, iteration: int) -> int:
    """The loop's seed for an iteration's new prompts and trees (added to `synthesis.seed` here)."""
    return cfg.seed + 1000 * iteration


def settings_for_iteration(cfg, iteration: int) -> SynthesisSettings:
    """The config's settings with the seed the loop's `iteration` samples with (`iteration_seed`), so that
    `alphallm synthesize --iteration N` draws the loop's samples for that iteration."""
    settings = SynthesisSettings.from_config(cfg.synthesis)
    return dataclasses.replace(settings, seed=settings.seed + iteration_seed(cfg, iteration))


def _sampler(cfg, model, tokenizer, mesh):
    from alphallm_jax.sampling import sampler_from_config

    return sampler_from_config(cfg, model, tokenizer, max_len=min(cfg.sampling.max_len, model.cfg.max_position_embeddings),
                               mesh=mesh)


def synthesize_from_config(cfg, policy_dir, seeds: Sequence[Problem], out_dir, *, seed: int, mesh=None,
                           previous: Sequence[tuple[str, str]] = (), id_prefix: str = "syn",
                           progress: bool = True) -> dict[str, Any]:
    """The loop's imagination stage: the policy at `policy_dir` writes prompts from `seeds` into `out_dir`.

    seed: this call's seed (added to `synthesis.seed`; the loop passes a new one per iteration).
    Returns a JSON-ready record: kept / sampled counts, the counts per filter (`counts`), and
    `prompts_file` ("prompts.jsonl", relative to `out_dir`), whose rows the search reads as prompts
    ({"id", "question", ...}).
    """
    from alphallm_jax.models.loading import load_policy

    settings = SynthesisSettings.from_config(cfg.synthesis)
    settings = dataclasses.replace(settings, seed=settings.seed + seed)
    tests = {s: _load(cfg, s) for s in test_splits(cfg)}
    result = load_synthesis(out_dir)
    if result is None:
        check_policy(out_dir, policy_dir)
        model, tokenizer = load_policy(cfg, str(policy_dir), mesh=mesh)
        result = synthesize(_sampler(cfg, model, tokenizer, mesh), seeds, settings, out_dir, test_questions=tests,
                            previous=previous, id_prefix=id_prefix, progress=progress)
    c = result.counts
    return {"kept": c["kept"], "sampled": c["generated"], "prompts_file": "prompts.jsonl", "counts": c,
            "summary": summary_line(c)}


def check_policy(out_dir, policy_dir) -> None:
    """Refuse to resume samples of another policy: `out_dir` records the content of the checkpoint at
    `policy_dir` on first use (`utils.run_identity`)."""
    from alphallm_jax.utils.io import files_fingerprint
    from alphallm_jax.utils.run_identity import check_run_identity

    check_run_identity(out_dir, {"policy": files_fingerprint(policy_dir)})


def _load(cfg, split: str) -> list[Problem]:
    """A test split the new prompts are checked against (as text: it may be another task's)."""
    from alphallm_jax.pipeline.evaluation import load_split

    return load_split(cfg, split, graded=False)


def run_synthesis(cfg, out_dir, model, tokenizer, *, iteration: int = 1,
                  previous: Sequence[tuple[str, str]] = (), mesh=None, progress: bool = True) -> SynthesisResult:
    """New prompts for `iteration` from the policy `model`; resumes or loads a finished `out_dir`.

    previous: (id, question) of the prompts of earlier iterations, so no iteration repeats another.
    Call `check_policy(out_dir, policy_dir)` first (before loading the model).
    """
    settings = settings_for_iteration(cfg, iteration)
    tests = {s: _load(cfg, s) for s in test_splits(cfg)}
    return synthesize(_sampler(cfg, model, tokenizer, mesh), d0_problems(cfg), settings, out_dir,
                      test_questions=tests, previous=previous, id_prefix=f"syn{iteration}", progress=progress)
