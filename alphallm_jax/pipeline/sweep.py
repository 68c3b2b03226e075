"""Evaluation sweeps (`alphallm sweep --config CONFIG --workdir DIR`): methods x budgets x checkpoints.

The grid comes from the config's `sweep` section:
  * checkpoints: `sweep.checkpoints` ("NAME=DIR" or "DIR") and, with `sweep.loop_workdir`, a loop run's
    base policy and every iteration's SFT and CPL policies (named base, iter_1/sft, iter_1/cpl, ...);
  * methods: `sweep.methods`, evaluation method names; a method that takes a budget (maj, orm, prm,
    pass, mcts, mcts_lean, beam) runs once per `sweep.budgets` entry (`maj@4`, `maj@16`, ...), the others once.
Every cell runs through the evaluation harness (`evaluation.evaluate_methods`), so problems are sharded
over JAX processes, each process appending its rows to its own part file (on a mesh spanning processes,
all run every problem together and process 0 writes one part), and a rerun skips finished problems; cells of one checkpoint share their samples (maj@16 and orm@16 read the same 16). The critics
and the fast-rollout policy come from `critics.checkpoint` / `rollout_policy.checkpoint`, else from
the loop run, else from DIR. Process 0 merges everything into DIR/sweep.json, DIR/sweep.md (one table)
and DIR/sweep.png (accuracy against generated tokens per question, a line per checkpoint and method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from alphallm_jax.pipeline import reporting
from alphallm_jax.pipeline.loop import STAGE_RECORD, read_stage_record
from alphallm_jax.utils.distributed import check_lockstep
from alphallm_jax.utils.io import as_path, atomic_write_json, atomic_write_text, read_json

# Methods whose spec takes a budget `@k` (samples, simulations or beam width); the rest run once.
BUDGETED_METHODS = ("maj", "orm", "prm", "pass", "mcts", "mcts_lean", "beam")


@dataclasses.dataclass(frozen=True)
class SweepCheckpoint:
    name: str
    path: str


def method_specs(methods: Sequence[str], budgets: Sequence[int]) -> list[str]:
    """The evaluation specs of the grid, in the config's order (a spec given as `name@k` is kept)."""
    from alphallm_jax.pipeline.eval_methods import make_method
    from alphallm_jax.pipeline.eval_methods import method_specs as split_methods

    if not methods:
        raise ValueError("config key sweep.methods is empty: name at least one evaluation method")
    specs: list[str] = []
    for method in split_methods(methods):
        name = method.partition("@")[0]
        if "@" in method or name not in BUDGETED_METHODS:
            cell = [method]
        elif not budgets:
            raise ValueError(f"sweep.methods has {method!r}, which takes a budget, and sweep.budgets is empty")
        else:
            cell = [f"{name}@{int(b)}" for b in budgets]
        for spec in cell:
            make_method(spec)  # an unknown method fails here, before any model loads
            if spec not in specs:
                specs.append(spec)
    return specs


def _named(entry: str) -> SweepCheckpoint:
    name, sep, path = entry.partition("=")
    if not sep:
        path = entry
        name = as_path(entry).name or entry
    if not name or not path:
        raise ValueError(f"sweep.checkpoints entry {entry!r}: expected 'NAME=DIR' or 'DIR'")
    return SweepCheckpoint(name, path)


def loop_checkpoints(loop_workdir) -> list[SweepCheckpoint]:
    """The base policy and every finished iteration's SFT and CPL policies of a loop run, from the stage
    records the loop wrote (a stage that kept its input policy names the same directory: listed once).
    The base is the policy the loop trained (base/stage.json) or, for a loop started from a checkpoint,
    the run config's `model.checkpoint` (config.json)."""
    root = as_path(loop_workdir)
    base = root / "base"
    found: list[SweepCheckpoint] = []
    if (base / STAGE_RECORD).exists():
        found.append(SweepCheckpoint("base", read_stage_record(base, root)["record"]["policy"]))
    elif (root / "config.json").exists():
        start = (read_json(root / "config.json").get("model") or {}).get("checkpoint")
        if start:
            found.append(SweepCheckpoint("base", str(start)))
    it = 1
    while (root / f"iter_{it}").exists():
        for stage in ("sft", "cpl"):
            stage_dir = root / f"iter_{it}" / stage
            if (stage_dir / STAGE_RECORD).exists():
                found.append(SweepCheckpoint(f"iter_{it}/{stage}",
                                             read_stage_record(stage_dir, root)["record"]["policy"]))
        it += 1
    if not found:
        raise FileNotFoundError(f"sweep.loop_workdir={loop_workdir}: no finished loop stage (base/stage.json, "
                                "iter_N/sft/stage.json) under it")
    return found


def sweep_checkpoints(cfg) -> list[SweepCheckpoint]:
    out = [_named(e) for e in cfg.sweep.checkpoints]
    if cfg.sweep.loop_workdir:
        out += loop_checkpoints(cfg.sweep.loop_workdir)
    if not out and cfg.model.checkpoint:
        out = [SweepCheckpoint("model", str(cfg.model.checkpoint))]
    if not out:
        raise ValueError("nothing to sweep: set sweep.checkpoints, sweep.loop_workdir or model.checkpoint")
    names, paths, unique = set(), set(), []
    for c in out:
        if c.path in paths:
            continue  # a loop stage that kept its input policy
        if c.name in names:
            raise ValueError(f"sweep checkpoint name {c.name!r} appears twice; name them 'NAME=DIR'")
        if not as_path(c.path).exists():
            raise FileNotFoundError(f"sweep checkpoint {c.name!r}: {c.path} does not exist")
        names.add(c.name)
        paths.add(c.path)
        unique.append(c)
    return unique


def run_sweep(cfg, workdir) -> dict:
    """Evaluate every cell of the grid (module doc); returns the merged rows (process 0) or {}."""
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.pipeline.evaluation import method_dirname
    from alphallm_jax.pipeline.loop import evaluate_policy

    specs = method_specs(list(cfg.sweep.methods), list(cfg.sweep.budgets))
    checkpoints = sweep_checkpoints(cfg)
    if jax.process_count() > 1:
        # Every process evaluates each checkpoint together: a loop run still writing its stages could show
        # the processes different lists, whose evaluations would pair up wrongly or deadlock.
        check_lockstep("sweep checkpoints", [[(c.name, c.path) for c in checkpoints]])
    root = as_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    component_root = cfg.sweep.loop_workdir or workdir  # where the critics and the fast policy live
    mesh = mesh_from_config(cfg)
    if jax.process_index() == 0:
        atomic_write_json(root / "config.json", cfg.to_dict())
    results = {}
    for c in checkpoints:
        print(f"[sweep] {c.name} ({c.path}): {', '.join(specs)}")
        results[c.name] = evaluate_policy(cfg, component_root, c.path, specs, root / method_dirname(c.name),
                                          mesh=mesh)
    if jax.process_index() != 0:
        return {}
    rows = [{"checkpoint": c.name, "path": c.path, "method": spec, **results[c.name][spec]}
            for c in checkpoints for spec in specs]
    table = {"split": cfg.eval.split, "limit": cfg.eval.limit, "methods": specs,
             "checkpoints": [dataclasses.asdict(c) for c in checkpoints], "rows": rows}
    atomic_write_json(root / "sweep.json", table)
    atomic_write_text(root / "sweep.md", sweep_markdown(table))
    series: dict[str, list] = {}
    for r in rows:
        label = f"{r['checkpoint']} {r['method'].partition('@')[0]}"
        series.setdefault(label, []).append((max(r["mean_generated_tokens"], 1.0), r["accuracy"]))
    reporting.plot_accuracy_vs_compute(series, root / "sweep.png",
                                       title=f"{cfg.eval.split}: accuracy vs compute")
    return table


def sweep_markdown(table: dict) -> str:
    """One row per checkpoint, one column per method spec: accuracy and tokens per question."""
    specs = table["methods"]
    by = {(r["checkpoint"], r["method"]): r for r in table["rows"]}
    n = table["rows"][0]["n"] if table["rows"] else 0
    lines = [f"# Sweep: {table['split']} ({n} problems)", "",
             "Accuracy (95% interval) and generated tokens per question.", "",
             "| checkpoint | " + " | ".join(specs) + " |", "| --- |" + " --- |" * len(specs)]
    for c in table["checkpoints"]:
        cells = []
        for spec in specs:
            r = by[(c["name"], spec)]
            if not r["n"]:  # no problem scored: no accuracy, no mean
                cells.append("-")
                continue
            lo, hi = r["ci95"]
            cells.append(f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], "
                         f"{r['mean_generated_tokens']:.0f} tok")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n![accuracy vs tokens](sweep.png)\n"
