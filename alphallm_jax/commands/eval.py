"""`alphallm eval --config CONFIG --workdir DIR`: evaluate a checkpoint with the config's methods."""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import define_run_flags


def define_flags() -> None:
    define_run_flags()


def main(argv) -> None:
    del argv
    from alphallm_jax.pipeline.evaluation import run_eval_from_config

    f = flags.FLAGS
    result = run_eval_from_config(f.config, f.workdir)
    for spec, s in result["summary"].items():
        lo, hi = s["ci95"]
        print(f"{spec:>12}: accuracy {100 * s['accuracy']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
              f"n={s['n']}  tokens/q {s['mean_generated_tokens']:.1f}  nodes/q {s['mean_nodes']:.1f}")
