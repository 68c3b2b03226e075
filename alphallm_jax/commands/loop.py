"""`alphallm loop --config CONFIG --workdir DIR`: the whole self-improvement loop, resumable.

The built-in demo (`configs/demo_arith.py`, the default) trains its tiny base policy and critics, runs
`loop.iterations` rounds of imagination, eta-MCTS, SFT and CPL-DPO on the arith task, and writes
DIR/report.json, DIR/report.md and plots. Rerun the same command after an interruption to resume.
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import DEMO_CONFIG, define_run_flags


def define_flags() -> None:
    define_run_flags(DEMO_CONFIG)


def main(argv) -> None:
    del argv
    from alphallm_jax.pipeline.loop import run_loop
    from alphallm_jax.pipeline.loop_report import find_method

    f = flags.FLAGS
    report = run_loop(f.config, f.workdir)

    def pct(r):
        return "-" if not r else f"{100 * r['accuracy']:.1f}%"

    print(f"\nbase policy:  greedy {pct(find_method(report['base'], 'greedy'))}, "
          f"mcts {pct(find_method(report['base'], 'mcts'))}")
    for it in report["iterations"]:
        print(f"iteration {it['iteration']}: {it['synthesized_prompts']} synthesized prompts; "
              f"SFT greedy {pct(it['sft'].get('greedy'))}; CPL greedy {pct(it['cpl'].get('greedy'))}; "
              f"CPL mcts {pct(find_method(it['cpl'], 'mcts'))}")
    print(f"report: {f.workdir}/report.md ({report['wall_seconds']:.0f} s of stage time)")
