"""`alphallm synthesize --config CONFIG --workdir DIR [--policy DIR]`: imagination on its own.

The policy (`--policy`, else `model.checkpoint`, else the demo's WORKDIR/base/policy) writes new prompts
from D0 (the `synthesis` config section); they land in WORKDIR/synthesis/ with counts per filter.
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import define_run_flags


def define_flags() -> None:
    define_run_flags()
    flags.DEFINE_string("policy", None, "The policy checkpoint (default: model.checkpoint, else WORKDIR/base/policy).")
    flags.DEFINE_integer("iteration", 1, "The loop iteration the prompts are for: its samples are the loop's for "
                         "that iteration (the loop also drops near-duplicates of earlier iterations' prompts, "
                         "which this command does not read).")


def main(argv) -> None:
    del argv
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.models.loading import load_policy
    from alphallm_jax.synthesis import require_prompts, run_synthesis, summary_line
    from alphallm_jax.synthesis.run import check_policy
    from alphallm_jax.utils.io import as_path

    f = flags.FLAGS
    cfg = f.config
    policy = f.policy or cfg.model.checkpoint or str(as_path(f.workdir) / "base" / "policy")
    out = as_path(f.workdir) / "synthesis"
    check_policy(out, policy)  # before loading it: a folder of another policy's samples is refused
    mesh = mesh_from_config(cfg)
    model, tokenizer = load_policy(cfg, policy, mesh=mesh)
    result = run_synthesis(cfg, out, model, tokenizer, iteration=f.iteration, mesh=mesh)
    print(summary_line(result.counts))
    require_prompts(result.counts, result.out_dir)
    print(f"prompts: {result.out_dir}/prompts.jsonl")
