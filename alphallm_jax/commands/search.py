"""`alphallm search --config CONFIG --workdir DIR`: eta-MCTS (or the beam baseline) over a split or prompts.

Loads the policy (`model.checkpoint`), the critics (`search.critics`, `critics.checkpoint` or
DIR/critics/critic) and, with `rollout_policy.enabled`, the fast-rollout policy; writes one tree JSONL per
problem under DIR/search/trees (a rerun skips finished problems) and DIR/search/summary.json. See
`alphallm_jax.pipeline.search_run`.
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import define_run_flags


def define_flags() -> None:
    define_run_flags()


def main(argv) -> None:
    del argv
    from alphallm_jax.pipeline.search_run import run_search_from_config

    f = flags.FLAGS
    s = run_search_from_config(f.config, f.workdir)
    accuracy = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}% ({s['correct']}/{s['graded']})"
    print(f"search {s['method']}: {s['num_problems']} problems ({s['searched_now']} searched now), "
          f"accuracy {accuracy}, nodes/q {s['mean_nodes']:.1f}, tokens/q {s['mean_generated_tokens']:.1f}, "
          f"{s['this_run']['wall_seconds']:.0f} s")
