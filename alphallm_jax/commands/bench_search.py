"""`alphallm bench search --workdir RUN --out FILE.json`: eta-MCTS over 64 problems in lockstep versus one
at a time, same config and models (see `alphallm_jax.benchmarks.search_bench`).

RUN is a directory of `alphallm loop` (or `train-critics` next to a policy): the policy is RUN/base/policy
unless `--policy` says otherwise; the critic and the fast-rollout policy are found as `alphallm search`
finds them. The problems are the first ones of `search.split` (default `eval.split`).

`--variant=KEY=VALUE[,KEY=VALUE...]` (repeatable) adds a lockstep search under the config with those
overrides to every timed round, e.g. `--variant=sampling.fine_row_buckets=true,critics.scoring.fine_row_buckets=true`
for 1.5x row buckets against powers of two, measured side by side.
"""

from __future__ import annotations

import json

from absl import flags

from alphallm_jax.commands import DEMO_CONFIG, define_run_flags


def define_flags() -> None:
    define_run_flags(DEMO_CONFIG, "A run of `alphallm loop` (policy, critics, fast-rollout policy).")
    flags.DEFINE_string("policy", None, "The policy checkpoint (default WORKDIR/base/policy).")
    flags.DEFINE_integer("num_problems", 64, "Problems searched in lockstep.")
    flags.DEFINE_integer("sequential_problems", 8, "Of those, how many are also searched one at a time.")
    flags.DEFINE_integer("repeats", 3, "Timed rounds (each runs every side once); seconds are medians over them.")
    flags.DEFINE_multi_string("variant", [], "KEY=VALUE[,KEY=VALUE...] config overrides of another lockstep "
                              "side timed in every round (repeatable).")
    flags.DEFINE_string("out", None, "Write the JSON result here (also printed).")


def variant_config(cfg, spec: str):
    """A copy of `cfg` with the overrides of one `--variant` (`KEY=VALUE,...`, typed as the keys they
    set; `pipeline.loop.overridden_config`)."""
    from alphallm_jax.pipeline.loop import overridden_config

    items = [part for part in spec.split(",") if part.strip()]
    if not items:
        raise ValueError(f"--variant={spec!r} sets nothing")
    return overridden_config(cfg, items, flag="--variant")


def main(argv) -> None:
    del argv
    from alphallm_jax.benchmarks.common import machine_info
    from alphallm_jax.benchmarks.search_bench import run_search_bench
    from alphallm_jax.models.loading import load_policy
    from alphallm_jax.pipeline.evaluation import load_split, prompt_builder
    from alphallm_jax.pipeline.search_run import (
        SearchSettings,
        load_critic_scorer,
        make_backend,
        rolls_out_with_fast_policy,
        search_problem,
    )
    from alphallm_jax.utils.io import as_path, atomic_write_json

    f = flags.FLAGS
    cfg = f.config
    policy = f.policy or str(as_path(f.workdir) / "base" / "policy")
    if not as_path(policy).exists():
        raise FileNotFoundError(f"no policy at {policy} (run `alphallm loop` into --workdir, or pass --policy)")
    model, tokenizer = load_policy(cfg, policy)
    prompt_for = prompt_builder(cfg, tokenizer)
    split = cfg.search.split or cfg.eval.split
    pool = [search_problem(p, prompt_for(p), cfg.seed) for p in load_split(cfg, split, f.num_problems)]
    if len(pool) < f.num_problems:
        raise ValueError(f"split {split} has {len(pool)} problems; the bench needs {f.num_problems}")
    settings = SearchSettings.from_config(cfg)
    scorer = load_critic_scorer(cfg, f.workdir, tokenizer)
    prompts = [p.prompt for p in pool]

    fast_policy = None
    if rolls_out_with_fast_policy(cfg, ("mcts",), settings):  # loaded once for every backend below
        from alphallm_jax.critics.fast_rollout import load_fast_rollout_policy

        fast_policy = load_fast_rollout_policy(cfg, f.workdir)

    def fresh_backend():
        return make_backend(cfg, f.workdir, model, tokenizer, prompts, scorer=scorer, settings=settings,
                            fast_policy=fast_policy)

    def variant_backend(vcfg):
        vscorer = load_critic_scorer(vcfg, f.workdir, tokenizer)
        return lambda: make_backend(vcfg, f.workdir, model, tokenizer, prompts, scorer=vscorer,
                                    settings=SearchSettings.from_config(vcfg), fast_policy=fast_policy)

    variants = {spec: variant_backend(variant_config(cfg, spec)) for spec in f.variant}

    prompt_ids = [tokenizer.encode(p.prompt, add_bos=True) for p in pool]
    prompt_tokens = {p.problem_id: len(ids) for p, ids in zip(pool, prompt_ids)}
    result = run_search_bench(fresh_backend, pool, settings.mcts, prompt_tokens,
                              sequential_problems=f.sequential_problems, prompt_ids=prompt_ids,
                              repeats=f.repeats, variants=variants)
    result.update({"policy": policy, "split": split, "machine": machine_info(), "mcts": settings.mcts.to_dict()})
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if f.out:
        atomic_write_json(f.out, json.loads(text))
