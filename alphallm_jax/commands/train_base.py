"""`alphallm train-base --config configs/demo_arith.py --workdir DIR`: the demo's base policy.

Trains the in-project tokenizer and the tiny policy on labelled D0 (resumable), then evaluates it on
the config's eval split with `base.eval_methods` (greedy and pass@16 by default).
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import DEMO_CONFIG, define_run_flags


def define_flags() -> None:
    define_run_flags(DEMO_CONFIG)


def main(argv) -> None:
    del argv
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.pipeline.base_policy import evaluate_base_policy, train_base_policy
    from alphallm_jax.utils.distributed import check_sampling_mesh

    f = flags.FLAGS
    mesh = mesh_from_config(f.config)
    check_sampling_mesh(mesh)  # the evaluation after training samples: refused before the training
    record = train_base_policy(f.config, f.workdir, mesh=mesh)
    print(f"base policy: {record['policy']}" + (" (already trained)" if record.get("skipped") else
          f" ({record['param_count']:,} parameters, {record['steps']} steps, {record['wall_seconds']:.0f} s)"))
    summary = evaluate_base_policy(f.config, f.workdir, mesh=mesh)
    for spec, s in summary.items():
        lo, hi = s["ci95"]
        print(f"{spec:>10}: accuracy {100 * s['accuracy']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {s['n']} "
              f"problems, {s['mean_generated_tokens']:.0f} tokens/question")
