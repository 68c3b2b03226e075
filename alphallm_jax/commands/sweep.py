"""`alphallm sweep --config CONFIG --workdir DIR`: evaluation methods x budgets x checkpoints, one table.

    alphallm sweep --workdir runs/sweep --config.sweep.loop_workdir=runs/demo \
        --config.sweep.methods=greedy,maj,orm,mcts --config.sweep.budgets=4,16
    alphallm sweep --workdir runs/sweep2 --config.sweep.checkpoints="'base=runs/demo/base/policy','cpl=DIR'"

Sharded over JAX processes (launch/local.sh, the TPU launcher) like `alphallm eval`; resumable.
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import DEMO_CONFIG, define_run_flags


def define_flags() -> None:
    define_run_flags(DEMO_CONFIG)


def main(argv) -> None:
    del argv
    from alphallm_jax.pipeline.sweep import run_sweep

    f = flags.FLAGS
    table = run_sweep(f.config, f.workdir)
    if table:
        for r in table["rows"]:
            print(f"{r['checkpoint']:>14} {r['method']:>10}: accuracy {100 * r['accuracy']:5.1f}% n={r['n']}  "
                  f"tokens/q {r['mean_generated_tokens']:.1f}")
        print(f"table: {f.workdir}/sweep.md, plot: {f.workdir}/sweep.png")
