"""The loop's report: `report.json`, `report.md` and two PNG plots, written atomically.

`accuracy_per_iteration.png`: greedy accuracy (and MCTS) of the base policy and after each
iteration's SFT and CPL rounds. `accuracy_vs_tokens.png`: every evaluated method of the base policy
and of the last iteration, accuracy against generated tokens per question.
"""

from __future__ import annotations

from typing import Any

from alphallm_jax.critics.calibration import auroc_text, metric_text
from alphallm_jax.pipeline import reporting
from alphallm_jax.utils.io import atomic_write_json, atomic_write_text


def _pct(r: dict | None) -> str:
    if not r or r.get("accuracy") is None or r.get("n") == 0:  # no problem scored: no accuracy
        return "-"
    lo, hi = r.get("ci95", (None, None))
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
    return f"{100 * r['accuracy']:.1f}%{ci}"


def _paired(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{100 * r['delta']:+.1f} points: +{r['gained']} / -{r['lost']} of {r['n']}, p = {r['p_value']:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# alphallm loop report", ""]
    cfg = report.get("config", {})
    lines += [f"task `{cfg.get('task')}`, {cfg.get('iterations')} iteration(s), seed {cfg.get('seed')}, "
              f"{report.get('wall_seconds', 0):.0f} s of stage time", ""]
    lines += ["## Base policy", "", "| method | accuracy [95% CI] | tokens/question |", "|---|---|---|"]
    for spec, r in report.get("base", {}).items():
        if isinstance(r, dict) and "accuracy" in r:
            lines.append(f"| {spec} | {_pct(r)} | {r.get('mean_generated_tokens', 0):.0f} |")
    lines += ["", "## Critics (dev split)", "", "| head | AUROC (95% interval over dev prompts) | ECE | precision | recall |",
              "|---|---|---|---|---|"]
    for head, r in report.get("critics", {}).items():
        if isinstance(r, dict) and "auroc" in r:
            cells = [r.get(k) for k in ("ece", "precision", "recall")]
            lines.append(f"| {head} | {auroc_text(r)} | " + " | ".join(metric_text(c) for c in cells) + " |")
    ablation = report.get("search_ablation")
    if ablation:
        lines += ["", f"## eta-MCTS components, added one at a time (base policy, {ablation['problems']} problems)", "",
                  "| search | accuracy [95% CI] | tokens/question | nodes/question | paper (GSM8K, 70B) |",
                  "|---|---|---|---|---|"]
        for r in ablation["rungs"]:
            label = r["label"] + (" (the configured search)" if r.get("configured") else "")
            lines.append(f"| {label} | {_pct(r)} | {r.get('mean_generated_tokens', 0):.0f} | "
                         f"{r.get('mean_nodes', 0):.1f} | {r['paper_gsm8k']:.1f}% |")
    lines += ["", "## Iterations", "",
              "| iteration | synthesized prompts | SFT traces | pairs (extracted; trained) | SFT greedy | CPL greedy | CPL mcts |",
              "|---|---|---|---|---|---|---|"]
    for it in report.get("iterations", []):
        untrained = it.get("untrained") or {}

        def cell(stage: str, result, untrained=untrained) -> str:  # a round that kept its policy says why
            why = untrained.get(stage)
            return _pct(result) + (f" (untrained: {why})" if why else "")

        lines.append(f"| {it['iteration']} | {it['synthesized_prompts']} | {it.get('sft_traces', '-')} | "
                     f"{_pairs_text(it)} | {cell('sft', it['sft'].get('greedy'))} | {cell('cpl', it['cpl'].get('greedy'))} | "
                     f"{cell('cpl', find_method(it['cpl'], 'mcts'))} |")
    imagined = [(it["iteration"], (it.get("synthesis") or {}).get("counts")) for it in report.get("iterations", [])]
    if any(counts for _, counts in imagined):
        lines += ["", "Imagination, per iteration: samples drawn, prompts kept, and samples dropped by each filter "
                  "(in the filters' order):", "", "| iteration | sampled | kept | dropped |", "|---|---|---|---|"]
        for iteration, counts in imagined:
            if counts:
                dropped = ", ".join(f"{k} {v}" for k, v in counts.get("dropped", {}).items() if v) or "none"
                lines.append(f"| {iteration} | {counts.get('generated', '-')} | {counts.get('kept', '-')} | {dropped} |")
    paired = [it for it in report.get("iterations", []) if any((it.get("paired_greedy") or {}).values())]
    if paired:
        lines += ["", "Greedy, paired on the same problems (gained: wrong before, right after; lost: the reverse; "
                  "exact McNemar p):", "", "| iteration | SFT vs the policy it started from | CPL vs SFT |", "|---|---|---|"]
        for it in paired:
            lines.append(f"| {it['iteration']} | {_paired(it['paired_greedy'].get('sft'))} | "
                         f"{_paired(it['paired_greedy'].get('cpl'))} |")
    if report.get("ablations"):
        lines += ["", "## Pair orderings (iteration 1, from the same SFT policy and trees)", "",
                  "| ordering | pairs | epoch | greedy mean | spread (max-min over seeds) |", "|---|---|---|---|---|"]
        for ordering, r in report["ablations"].items():
            if not r["epochs"]:
                lines.append(f"| {ordering} | {r['train_pairs']} | - | untrained: {r.get('untrained')} | - |")
            for e in r["epochs"]:
                lines.append(f"| {ordering} | {r['train_pairs']} | {e['epoch']} | {100 * e['mean']:.1f}% | "
                             f"{100 * e['spread']:.1f} |")
    lines += ["", "![accuracy per iteration](accuracy_per_iteration.png)",
              "![accuracy vs tokens](accuracy_vs_tokens.png)", ""]
    return "\n".join(lines)


def _pairs_text(it: dict) -> str:
    """`stepwise 7, complete 17, q_pair 198; 18`: the pairs extracted per kind, then those CPL trained on."""
    extracted = ", ".join(f"{k} {v}" for k, v in (it.get("pairs") or {}).items()) or "-"
    trained = it.get("train_pairs")
    return extracted + ("" if trained is None else f"; {trained}")


def find_method(methods: dict, name: str) -> dict | None:
    """`methods[name]`, or the first `name@k` entry (e.g. `mcts@40` for `mcts`)."""
    if name in methods:
        return methods[name]
    return next((v for k, v in methods.items() if k.partition("@")[0] == name), None)


def _plot_iterations(report: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    iters = report.get("iterations", [])
    base = report.get("base", {})
    for label, stage, name in (("SFT greedy", "sft", "greedy"), ("CPL greedy", "cpl", "greedy"),
                               ("CPL mcts", "cpl", "mcts")):
        points = [(0, find_method(base, name))] + [(it["iteration"], find_method(it[stage], name)) for it in iters]
        points = [(x, 100 * r["accuracy"]) for x, r in points if r and r.get("accuracy") is not None]
        if len(points) > 1:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("iteration (0: base policy)")
    ax.set_xticks([0] + [it["iteration"] for it in iters])  # whole iterations, not 0.25 steps
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    reporting.save_figure(fig, path, dpi=120)


def write_report(report: dict[str, Any], root) -> None:
    atomic_write_json(root / "report.json", report)
    _plot_iterations(report, root / "accuracy_per_iteration.png")
    families: dict[str, list[tuple[float, float]]] = {}
    sources = [("base", report.get("base", {}))]
    if report.get("iterations"):
        last = report["iterations"][-1]
        sources.append((f"iter{last['iteration']} cpl", last["cpl"]))
    for tag, methods in sources:
        for spec, r in methods.items():
            if isinstance(r, dict) and "accuracy" in r:
                families.setdefault(f"{tag} {spec.split('@')[0]}", []).append(
                    (max(r.get("mean_generated_tokens", 1.0), 1.0), r["accuracy"]))
    reporting.plot_accuracy_vs_compute(families, root / "accuracy_vs_tokens.png",
                                       title="accuracy vs generated tokens per question")
    atomic_write_text(root / "report.md", markdown(report))
