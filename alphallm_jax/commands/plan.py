"""`alphallm plan --config CONFIG [--out FILE.json]`: per-device memory of every model on the mesh.

Nothing is allocated: the models are built abstractly and sized on an abstract mesh of the configured
shape, so a plan for a 64-chip pod runs on a laptop (see alphallm_jax/pipeline/plan.py).
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import define_config_flag


def define_flags() -> None:
    define_config_flag()
    flags.DEFINE_string("out", None, "Also write the plan as JSON to this file.")


def main(argv) -> None:
    del argv
    from alphallm_jax.pipeline.plan import format_plan, make_plan
    from alphallm_jax.utils.io import atomic_write_json

    f = flags.FLAGS
    plan = make_plan(f.config)
    print(format_plan(plan))
    if f.out:
        atomic_write_json(f.out, plan)
        print(f"plan written to {f.out}")
