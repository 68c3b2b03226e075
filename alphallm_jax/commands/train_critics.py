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
    from alphallm_jax.critics.calibration import auroc_text, metric_text
    from alphallm_jax.critics.pipeline import run_train_critics

    f = flags.FLAGS
    out = run_train_critics(f.config, f.workdir)
    cal = out["calibration"]
    for name in ("value", "value_tool", "prm", "prm_tool", "orm", "orm_tool", "orm_combined"):
        if name not in cal:  # orm_combined: only with a fitted outcome combiner
            continue
        m = cal[name]
        print(f"{name:>10}: precision {metric_text(m['precision'])} recall {metric_text(m['recall'])} ECE {metric_text(m['ece'])} "
              f"AUROC {auroc_text(m)} (n={m['n']})")
    for spec, s in (out["eval"] or {}).items():
        lo, hi = s["ci95"]
        print(f"{spec:>10}: accuracy {100 * s['accuracy']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {s['n']} problems")
    t = out["timings"]
    print("stage seconds (wall / process CPU): " + ", ".join(
        f"{k} {v:.0f}/{t[k + '_cpu']:.0f}" for k, v in t.items() if not k.endswith("_cpu")))

