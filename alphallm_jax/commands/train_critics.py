"""`alphallm train-critics --config configs/demo_arith.py --workdir DIR`: the value function, PRM and ORM.

Rolls the policy out on labelled D0 (MC labels), trains the three-headed critic with the shared
trainer, writes a calibration report (precision, recall, ECE, AUROC per critic) and evaluates
best-of-k reranking (`orm@k`, `prm@k`) against greedy and maj@k. Everything lands in DIR/critics
and a rerun resumes; see `alphallm_jax.critics.pipeline`.
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import DEMO_CONFIG, define_run_flags


def define_flags() -> None:
    define_run_flags(DEMO_CONFIG)


def main(argv) -> None:
    del argv
    from alphallm_jax.critics.pipeline import run_train_critics

    f = flags.FLAGS
    out = run_train_critics(f.config, f.workdir)
    cal = out["calibration"]
    for name in ("value", "prm", "orm", "orm_tool"):
        m = cal[name]
        print(f"{name:>9}: precision {_f(m['precision'])} recall {_f(m['recall'])} ECE {_f(m['ece'])} "
              f"AUROC {_f(m['auroc'])} (n={m['n']})")
    for spec, s in (out["eval"] or {}).items():
        lo, hi = s["ci95"]
        print(f"{spec:>9}: accuracy {100 * s['accuracy']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {s['n']} problems")
    t = out["timings"]
    print("stage seconds (wall / process CPU): " + ", ".join(
        f"{k} {v:.0f}/{t[k + '_cpu']:.0f}" for k, v in t.items() if not k.endswith("_cpu")))


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
