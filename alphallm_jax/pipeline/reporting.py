"""Summaries of evaluation results: accuracy with a 95% interval, markdown tables, compute plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sane at 0% and 100%, unlike +-1.96 se)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(rows: Sequence[Mapping]) -> dict:
    """Accuracy, its interval and mean compute of per-problem result rows; `strict_accuracy` counts only
    answers marked as final (rows' `correct_strict`; absent when a row lacks it)."""
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    lo, hi = wilson_interval(correct, n)
    strict = ({"strict_accuracy": sum(bool(r["correct_strict"]) for r in rows) / n if n else 0.0}
              if all("correct_strict" in r for r in rows) else {})
    return {
        "accuracy": correct / n if n else 0.0,
        **strict,
        "n": n,
        "correct": correct,
        "ci95": [lo, hi],
        "mean_generated_tokens": sum(r["generated_tokens"] for r in rows) / n if n else 0.0,
        "mean_nodes": sum(r["nodes"] for r in rows) / n if n else 0.0,
    }


def markdown_table(methods: Mapping[str, Mapping], title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | accuracy | 95% CI | strict | n | tokens / question | nodes / question |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in methods.items():
        if not s["n"]:  # no problem scored: every mean is undefined, not 0
            lines.append(f"| {name} | - | - | - | 0 | - | - |")
            continue
        lo, hi = s["ci95"]
        strict = f"{100 * s['strict_accuracy']:.1f}%" if "strict_accuracy" in s else "-"
        lines.append(f"| {name} | {100 * s['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f} | {strict} | {s['n']} "
                     f"| {s['mean_generated_tokens']:.1f} | {s['mean_nodes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_compute(series: Mapping[str, Sequence[tuple[float, float]]], path, title: str) -> None:
    """One point (tokens per question, accuracy) per method, or a line per family of budgets.

    A series label "GROUP METHOD" (e.g. "iter_1/cpl orm") takes its colour from GROUP and its marker from
    METHOD, so a grid of checkpoints x methods stays readable; the legend sits beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(name.rpartition(" ")[0] for name in series))
    methods = list(dict.fromkeys(name.rpartition(" ")[2] for name in series))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    markers = "osD^vP*Xph"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, points in series.items():
        group, _, method = name.rpartition(" ")
        points = sorted(points)
        xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
        ax.plot(xs, ys, marker=markers[methods.index(method) % len(markers)], label=name,
                color=colours(groups.index(group) % colours.N))
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per question")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path, dpi: int | None = None) -> None:
    """Write a matplotlib figure as PNG atomically (replacing an earlier run's) and close it."""
    import io

    import matplotlib.pyplot as plt

    from alphallm_jax.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
