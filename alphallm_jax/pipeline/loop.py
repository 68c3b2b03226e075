"""The self-improvement loop (`alphallm loop --config CONFIG --workdir DIR`), the product's main job.

    base policy -> fast-rollout policy (when configured) -> critics -> base evaluation -> search ablation
    (optional) -> for each iteration:
        imagination (synthesize unlabelled prompts from D0 seeds with the current policy)
        -> eta-MCTS on them (policy + critics) -> SFT on the best traces (AlphaLLM's round)
        -> trajectory pairs -> CPL-DPO from the SFT policy -> evaluation
    -> ablations (pair orderings) -> report.json / report.md / plots

Every stage runs in its own directory and ends by writing `stage.json` (its one-line record) and a
`DONE` marker, atomically; a rerun skips finished stages, and inside a stage the components resume
on their own (the trainer from its orbax checkpoints, the search and evaluation per problem), so a
run killed at any moment (`kill -9` included) resumes and ends with the same artifacts as an
uninterrupted run with the same seed. Labels of D0 are used for the base policy, the critics and
the evaluation of test splits only; the synthesized prompts the policy improves on carry none.

Multi-host (`launch/local.sh`, `launch/tpu_pod.sh`): every process runs every stage; training is one
program over all of them; searches and evaluations split their problems, or, on a mesh spanning the
processes, run every problem on every process in lockstep (`utils.distributed`); process 0 writes the
stage records and markers (see `LoopRun.stage`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from alphallm_jax.config import config_section
from alphallm_jax.critics.calibration import auroc_text, metric_text
from alphallm_jax.paper_presets import SIZED_KEYS
from alphallm_jax.pipeline.loop_report import find_method, write_report
from alphallm_jax.pipeline.paired import paired_comparison
from alphallm_jax.utils.distributed import barrier, broadcast_int, check_sampling_mesh, is_coordinator
from alphallm_jax.utils.io import (
    ABSENT,
    as_path,
    atomic_write_json,
    atomic_write_text,
    json_changes,
    key_in,
    read_json,
    rebase_paths,
)

DONE = "DONE"
STAGE_RECORD = "stage.json"


def read_stage_record(stage_dir, root) -> dict:
    """A finished stage's `stage.json`, the paths in its record moved under `root` when the workdir was
    written under another root (`rebase_paths`): a moved or copied workdir resumes and reports."""
    finished = read_json(as_path(stage_dir) / STAGE_RECORD)
    return {**finished, "record": rebase_paths(finished["record"], finished.get("workdir"), str(root))}


@dataclasses.dataclass
class LoopRun:
    cfg: ml_collections.ConfigDict
    root: Any  # epath.Path
    mesh: Any = None
    log: Callable[[str], None] = print
    # Wall seconds of every stage this run went through (of the attempt that finished it), in order.
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def finished(self, name: str) -> bool:
        """Whether stage `name` finished before. Both files: a stage's own work may mark its folder DONE
        too (synthesis does, for the standalone command), and a run killed after that but before the
        record is written has not finished. Process 0's answer on every process."""
        stage_dir = self.root / name
        return bool(broadcast_int((stage_dir / DONE).exists() and (stage_dir / STAGE_RECORD).exists()))

    def stage(self, name: str, fn: Callable[[Any], dict], summary: Callable[[dict], str] | None = None) -> dict:
        """Run `fn(stage_dir)` unless the stage finished before; returns its record."""
        stage_dir = self.root / name
        # Multi-host: every process takes process 0's branch, runs the stage (its collectives and its
        # share of the work), and continues with the record process 0 wrote, read back after a barrier.
        if self.finished(name):
            self.log(f"[{name}] done before; skipped")
            finished = read_stage_record(stage_dir, self.root)
            self.stage_seconds[name] = float(finished.get("wall_seconds", 0.0))
            return finished["record"]
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        record = fn(stage_dir)
        seconds = round(time.time() - start, 1)
        barrier(f"loop:{name}:ran")
        if is_coordinator():
            # The root the record's paths were written under: a moved workdir rebases them on resume.
            atomic_write_json(stage_dir / STAGE_RECORD, {"record": record, "wall_seconds": seconds,
                                                         "workdir": str(self.root)})
            atomic_write_text(stage_dir / DONE, "ok\n")
        barrier(f"loop:{name}:done")
        finished = read_stage_record(stage_dir, self.root)
        self.stage_seconds[name] = float(finished["wall_seconds"])
        line = summary(finished["record"]) if summary else "done"
        self.log(f"[{name}] {line} ({seconds:.0f} s)")
        return finished["record"]


def derived_config(cfg, **overrides) -> ml_collections.ConfigDict:
    """A copy of `cfg` with dotted-key overrides (`{"model.checkpoint": path}`); keys must exist."""
    out = cfg.copy_and_resolve_references()
    for dotted, value in overrides.items():
        section, leaf = config_section(out, dotted)
        section[leaf] = value
    return out


def override_value(text: str, current):
    """`text` as an override of the config value `current`, in its type: a boolean from true/false, 1/0 or
    yes/no; a number or string converted; a tuple or list from a Python literal of one
    (`ast.literal_eval`, never eval); an unset value from a literal, else the text itself."""
    import ast

    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError("a config section, not a value: override its keys")
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{text!r} is not a boolean (true or false)")
        return lowered in ("true", "1", "yes")
    if isinstance(current, (int, float, str)):
        return type(current)(text.strip() if not isinstance(current, str) else text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"{text!r} is not a Python literal of a {type(current).__name__}") from None
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{text!r} is not a tuple, e.g. ('a', 'b')")
        return type(current)(value)
    return value


def overridden_config(cfg, items, *, flag: str) -> ml_collections.ConfigDict:
    """A copy of `cfg` with `KEY=VALUE` items (`override_value` reads each VALUE as its key's type), for
    flags that set config keys (`flag` names it in errors); a key the config lacks fails naming the
    valid keys where it was looked up."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE, e.g. eval.temperature=1.0")
        try:
            section, leaf = config_section(cfg, key)
        except KeyError as e:
            raise ValueError(f"{flag} {item!r}: {e.args[0]}") from None
        try:
            overrides[key] = override_value(text, section[leaf])
        except ValueError as e:
            raise ValueError(f"{flag} {item!r}: {e}") from None
    return derived_config(cfg, **overrides)


def _acc(summary: dict, spec: str) -> dict:
    s = summary[spec]
    out = {"accuracy": s["accuracy"], "n": s["n"], "ci95": s["ci95"],
           "mean_generated_tokens": s["mean_generated_tokens"]}
    if "mean_nodes" in s:
        out["mean_nodes"] = s["mean_nodes"]
    return out


def evaluate_policy(cfg, workdir, policy_dir, methods, out_dir, *, mesh=None) -> dict:
    """`methods` on the config's eval split with the policy at `policy_dir`; the critics and the search
    backend are loaded when a method needs them. Returns {spec: {"accuracy", "n", ...}}."""
    from alphallm_jax.pipeline.eval_methods import method_specs
    from alphallm_jax.pipeline.evaluation import evaluate_checkpoint

    summary, _ = evaluate_checkpoint(cfg, workdir, policy_dir, methods, out_dir, mesh=mesh)
    return {spec: _acc(summary, spec) for spec in method_specs(methods)}


def _fmt(results: dict) -> str:
    return ", ".join(f"{spec} {100 * r['accuracy']:.1f}%" for spec, r in results.items())


# What a resumed run may change: how far the loop goes and where it runs, never what a finished stage
# computed (finished stages are not recomputed, so any other change would mix two configs in one report).
# The ordering ablations are the last stages, each run keyed by its ordering and seed from the same SFT
# policy and trees: a rerun may add or leave out some without changing the others. Where it runs
# includes what a preset sizes for its mesh (`paper_presets.SIZED_KEYS`, sized again after a mesh
# override): microbatches of the same batches, per-layer remat of the same step, KV pool slots (what is
# cached, not what is computed).
RESUMABLE_KEYS = ("loop.iterations", "loop.ablation_orderings", "loop.ablation_seeds", "mesh.", *SIZED_KEYS)


def check_resumed_config(cfg, path) -> list[str]:
    """The dotted keys where `cfg` differs from the config a run in this workdir started with (`path`,
    its config.json); raises a ValueError naming them unless every one is in `RESUMABLE_KEYS` or is a
    key newer than that run left at its default (a new key's default keeps the code's old behaviour, so
    the finished stages computed what it says). A key the run started with and this code no longer has
    also stops it, with its own message: that key cannot be set back."""
    from alphallm_jax.config import default_config

    path = as_path(path)
    if not path.exists():
        return []
    recorded = read_json(path)
    changes = json_changes(recorded, cfg.to_dict())
    if _same_search(recorded, cfg):  # `alpha: None` (the preset's value) and that value set: one search
        changes = [c for c in changes if not c[0].startswith("search.mcts.")]
    off_default = {k for k, _, _ in json_changes(default_config().to_dict(), cfg.to_dict())}
    removed = [c for c in changes if c[2] == ABSENT and not key_in(c[0], RESUMABLE_KEYS)]
    if removed:  # the run started with keys this code no longer reads, so it cannot set them back
        listed = "; ".join(f"{k} (the run started with {a!r})" for k, a, _ in removed)
        raise ValueError(f"{path} holds the config this workdir's run started with, and this code no longer has "
                         f"the keys {listed}: the finished stages may have computed what this code cannot. "
                         f"Resume with the code the run started with, or use a new --workdir.")
    fixed = [c for c in changes if not key_in(c[0], RESUMABLE_KEYS)
             and not (c[1] == ABSENT and c[0] not in off_default)]
    if fixed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in fixed[:12])
        more = f" (and {len(fixed) - 12} more)" if len(fixed) > 12 else ""
        raise ValueError(f"{path} holds the config this workdir's run started with, and this run's config "
                         f"differs in {listed}{more}. Finished stages are not recomputed, so resuming would mix "
                         f"two configs in one report: use a new --workdir, or set these keys back (a resumed run "
                         f"may change only {', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_KEYS)}).")
    return [k for k, _, _ in changes]


def _same_search(recorded: dict, cfg) -> bool:
    """Whether the recorded config's eta-MCTS settings resolve (preset plus the fields set) to `cfg`'s."""
    from alphallm_jax.pipeline.search_run import mcts_config_from

    try:
        return mcts_config_from(recorded["search"]["mcts"]) == mcts_config_from(cfg.search.mcts)
    except (KeyError, TypeError, ValueError):  # a section this code cannot read: compared key by key
        return False


def run_loop(cfg, workdir) -> dict:
    """Every stage of the loop (module doc); returns the report (also written to DIR/report.json)."""
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.critics.pipeline import tool_config
    from alphallm_jax.pipeline.plan import check_device_memory
    from alphallm_jax.pipeline.search_run import mcts_config_from
    from alphallm_jax.train.pairs import check_pair_margin

    start = time.time()
    run = LoopRun(cfg=cfg, root=as_path(workdir), mesh=mesh_from_config(cfg))
    run.root.mkdir(parents=True, exist_ok=True)
    check_resumed_config(cfg, run.root / "config.json")
    _next_policy_stage(cfg)  # bad values fail now, not after the first iteration's training
    _sft_plan(cfg)
    check_train_batches(cfg, run.mesh, finished=run.finished)
    check_sampling_mesh(run.mesh)  # the loop samples in nearly every stage
    check_device_memory(cfg, skip=finished_plan_stages(cfg, run.finished))
    tool_config(cfg)
    check_pair_margin(cfg.policy_train.tau, mcts_config_from(cfg.search.mcts),
                      cfg.policy_train.complete_value_field)
    if is_coordinator():
        atomic_write_json(run.root / "config.json", cfg.to_dict())
    report: dict[str, Any] = {"config": {"task": cfg.task, "iterations": cfg.loop.iterations, "seed": cfg.seed}}

    policy_dir = _base_policy(run)
    _fast_rollout_policy(run, policy_dir)
    report["critics"] = _critics(run, policy_dir)
    report["base"] = run.stage("base_eval", lambda d: evaluate_policy(
        cfg, run.root, policy_dir, cfg.loop.base_methods, d, mesh=run.mesh), _fmt)

    if cfg.loop.search_ablation:
        report["search_ablation"] = _search_ablation(run, policy_dir)

    report["iterations"] = []
    base_policy = policy_dir
    for it in range(1, cfg.loop.iterations + 1):
        record, policy_dir = _iteration(run, it, policy_dir, base_policy)
        report["iterations"].append(record)

    report["ablations"] = _ablations(run) if cfg.loop.ablation_orderings and cfg.loop.ablation_seeds > 0 else {}
    report["stage_seconds"] = dict(run.stage_seconds)
    report["wall_seconds"] = round(sum(run.stage_seconds.values()), 1)
    report["this_invocation_seconds"] = round(time.time() - start, 1)
    if is_coordinator():
        write_report(report, run.root)
    barrier("loop:report")
    return report


def trained_sections(cfg, finished: Callable[[str], bool] = lambda stage: False) -> list[str]:
    """The training sections (dotted config keys) the loop's stages will still train with: none of a stage
    that `finished` before (a resumed run may change its mesh), no policy round without iterations."""
    stages = {"base.train": "base", "rollout_policy.train": "fast_rollout", "critics.train": "critics_stage"}
    sections = [] if cfg.model.checkpoint else ["base.train"]
    if cfg.rollout_policy.enabled and not cfg.rollout_policy.checkpoint:
        sections.append("rollout_policy.train")
    sections.append("critics.train")
    sections = [key for key in sections if not finished(stages[key])]
    return sections + (["policy_train.sft", "policy_train.dpo"] if cfg.loop.iterations > 0 else [])


def finished_plan_stages(cfg, finished: Callable[[str], bool] = lambda stage: False) -> tuple[str, ...]:
    """The plan's stages (`alphallm plan`) this run will not enter: those only finished loop stages
    needed (a resumed run is not refused for memory it will not use again; the fast-rollout policy and
    the critic still serve in the search, whose stage stays checked), and the policy's training in a
    loop without iterations whose base policy is loaded or trained."""
    skip: tuple[str, ...] = ()
    if finished("fast_rollout"):
        skip += ("rollout_policy_training",)
    if finished("critics_stage"):
        skip += ("critic_data", "critic_training")
    if cfg.loop.iterations == 0 and (cfg.model.checkpoint or finished("base")):
        skip += ("policy_training",)
    return skip


def check_train_batches(cfg, mesh, *, finished: Callable[[str], bool] = lambda stage: False) -> None:
    """Every training section's batch must split over the mesh the loop trains on, checked before the
    first stage: the trainer refuses one that does not, which for DPO would come after hours of search."""
    from alphallm_jax.train.batching import microbatch_problem
    from alphallm_jax.train.trainer import train_batch_shards

    dp = train_batch_shards(mesh)
    problems = []
    for key in trained_sections(cfg, finished):
        parent, name = config_section(cfg, key)
        problem = microbatch_problem(parent[name].batch_size, parent[name].grad_accum_steps, dp)
        if problem:
            problems.append(f"{key}: {problem} (--config.{key}.grad_accum_steps)")
    if problems:
        raise ValueError("training batches do not split over the mesh:\n  " + "\n  ".join(problems))


def _base_policy(run: LoopRun) -> str:
    """The demo trains its tiny policy; a real run starts from `model.checkpoint`."""
    cfg = run.cfg
    if cfg.model.checkpoint:
        return str(cfg.model.checkpoint)

    def train(_stage_dir):
        from alphallm_jax.pipeline.base_policy import train_base_policy

        return train_base_policy(cfg, run.root, mesh=run.mesh)

    record = run.stage("base", train, _policy_line)
    return record["policy"]


def _fast_rollout_policy(run: LoopRun, policy_dir: str) -> None:
    """The fast-rollout policy (`rollout_policy`), trained like the base policy on its tokenizer: a policy
    for the search's rollouts, in a stage of its own before the critics, which may start from it."""
    cfg = run.cfg
    if not cfg.rollout_policy.enabled or cfg.rollout_policy.checkpoint:
        return

    def train(_stage_dir):
        from alphallm_jax.critics.fast_rollout import train_fast_rollout_policy

        return train_fast_rollout_policy(cfg, run.root, policy_dir, mesh=run.mesh)

    run.stage("fast_rollout", train, _policy_line)


def _policy_line(r: dict) -> str:
    if r.get("skipped"):
        return f"policy {r['policy']} (trained before)"
    return (f"policy {r['policy']}: {r['param_count']:,} parameters, {r['steps']} steps, "
            f"best dev loss {r['best_dev_loss']:.4f}")


def _critics(run: LoopRun, policy_dir: str) -> dict:
    """Value, PRM and ORM trained on the base policy's rollouts on labelled D0; calibration per head."""
    cfg = derived_config(run.cfg, **{"critics.policy": policy_dir, "critics.eval_methods": ()})

    def train(_stage_dir):
        from alphallm_jax.critics.pipeline import run_train_critics

        out = run_train_critics(cfg, run.root)
        cal = out["calibration"]
        return {name: {k: cal[name][k] for k in ("auroc", "auroc_ci", "ece", "precision", "recall") if k in cal[name]}
                for name in cal if isinstance(cal[name], dict) and "auroc" in cal[name]}

    def summary(record):  # AUROC is None when the dev split has one class only (a barely trained policy)
        return ", ".join(f"{k} AUROC {auroc_text(v)} ECE {metric_text(v['ece'])}"
                         for k, v in record.items() if isinstance(v, dict))

    return run.stage("critics_stage", train, summary)


def _search_ablation(run: LoopRun, policy_dir: str) -> dict:
    """eta-MCTS with its components added one at a time in the paper's order (`pipeline.search_ablation`),
    with the base policy and critics on the first `loop.search_ablation_limit` evaluation problems."""
    from alphallm_jax.pipeline.evaluation import load_eval_problems, predictions_path, seed_results
    from alphallm_jax.pipeline.search_ablation import rung_overrides
    from alphallm_jax.pipeline.search_run import SearchSettings
    from alphallm_jax.utils.io import read_jsonl

    cfg = run.cfg
    limit = cfg.loop.search_ablation_limit or cfg.eval.limit
    # The configured search is the base evaluation's mcts: same policy, critics, config and per-problem
    # seeds, so its trees on the first `limit` problems are those of the base evaluation (a tree depends
    # only on its problem's seed). Its results are reused rather than searched again.
    base_mcts = predictions_path(run.root / "base_eval", "mcts")
    rows = []
    for rung, changes in rung_overrides(SearchSettings.from_config(cfg).mcts):
        c = derived_config(cfg, **{"eval.limit": limit}, **{f"search.mcts.{k}": v for k, v in changes.items()})

        def fn(stage_dir, c=c, reuse=not changes and "mcts" in cfg.loop.base_methods and base_mcts.exists()):
            if reuse:
                seed_results(load_eval_problems(c), "mcts", read_jsonl(base_mcts), stage_dir, mesh=run.mesh)
            return evaluate_policy(c, run.root, policy_dir, ("mcts",), stage_dir, mesh=run.mesh)["mcts"]

        result = run.stage(f"search_ablation/{rung.name}", fn,
                           lambda r, label=rung.label: f"{label}: mcts {100 * r['accuracy']:.1f}%")
        rows.append({"rung": rung.name, "label": rung.label, "paper_gsm8k": rung.paper_gsm8k,
                     "changes": changes, "configured": not changes, **result})
    return {"problems": rows[0]["n"], "rungs": rows}


def _sft_plan(cfg) -> tuple[str, str]:
    """`loop.sft_traces` and `loop.sft_init`, checked."""
    traces, init = cfg.loop.sft_traces, cfg.loop.sft_init
    if traces not in ("iteration", "accumulated"):
        raise ValueError(f"loop.sft_traces must be 'iteration' or 'accumulated', got {traces!r}")
    if init not in ("previous", "base"):
        raise ValueError(f"loop.sft_init must be 'previous' or 'base', got {init!r}")
    return traces, init


def sft_inputs(run: LoopRun, it: int, policy_dir: str, base_policy: str) -> tuple[str, str]:
    """Iteration `it`'s SFT: its starting policy and its `policy_train.trees_dir` (`_sft_plan`)."""
    traces, init = _sft_plan(run.cfg)
    first = 1 if traces == "accumulated" else it
    trees = ",".join(str(run.root / f"iter_{k}" / "search" / "trees") for k in range(first, it + 1))
    return (base_policy if init == "base" else policy_dir), trees


def _iteration(run: LoopRun, it: int, policy_dir: str, base_policy: str) -> tuple[dict, str]:
    cfg = run.cfg
    name = f"iter_{it}"
    it_root = run.root / name
    from alphallm_jax.synthesis.run import iteration_seed

    seed = iteration_seed(cfg, it)  # new prompts and new trees every iteration

    def synthesize(stage_dir):
        from alphallm_jax.synthesis import d0_problems, previous_prompts, require_prompts, synthesize_from_config

        # Earlier iterations' prompts count as near-duplicates: every iteration searches new questions.
        earlier = previous_prompts([run.root / f"iter_{k}" / "synthesis" for k in range(1, it)])
        rec = synthesize_from_config(cfg, policy_dir, d0_problems(cfg), stage_dir, seed=seed, mesh=run.mesh,
                                     previous=earlier, id_prefix=f"syn{it}")
        require_prompts(rec["counts"], stage_dir)  # before the stage is marked finished: a rerun stops here too
        return rec

    syn = run.stage(f"{name}/synthesis", synthesize, lambda r: f"{r['kept']} prompts kept of {r['sampled']}")
    prompts_file = str(it_root / "synthesis" / syn["prompts_file"])

    def search(stage_dir):
        from alphallm_jax.models.loading import load_policy
        from alphallm_jax.pipeline.evaluation import prompt_builder
        from alphallm_jax.pipeline.search_run import (
            SearchSettings,
            make_backend,
            read_prompts_file,
            search_to_dir,
            summarize_trees,
        )

        model, tokenizer = load_policy(cfg, policy_dir, mesh=run.mesh)
        problems = read_prompts_file(prompts_file, cfg.task, prompt_builder(cfg, tokenizer), seed)
        settings = SearchSettings.from_config(cfg)
        backend = make_backend(cfg, run.root, model, tokenizer, [p.prompt for p in problems], mesh=run.mesh,
                               settings=settings)
        trees, _ = search_to_dir(problems, backend, settings, stage_dir / "trees", method="mcts",
                                 problems_per_call=cfg.search.problems_per_call, desc=f"{name} search")
        summary = summarize_trees(trees)
        return {k: summary[k] for k in ("num_problems", "mean_nodes", "mean_generated_tokens",
                                        "mean_simulations", "mean_terminals")}

    srch = run.stage(f"{name}/search", search, lambda r: f"{r['num_problems']} trees, "
                                                          f"{r['mean_nodes']:.1f} nodes/question")
    trees_dir = str(it_root / "search" / "trees")
    sft_start, sft_trees = sft_inputs(run, it, policy_dir, base_policy)

    def train_policy(method: str, init_policy: str, trees: str, **overrides):
        def fn(stage_dir):
            from alphallm_jax.train.policy_training import run_policy_training

            c = derived_config(cfg, **{"model.checkpoint": init_policy, "policy_train.trees_dir": trees,
                                       **overrides})
            # Nothing may pass the critic's bar (a weak policy, a tiny budget): the policy then stays as it
            # was, and the record says why (`untrained`) rather than failing the loop.
            rec = run_policy_training(c, stage_dir, method, mesh=run.mesh, allow_untrained=True)
            keep = ("policy", "num_trees", "sft_traces", "pairs", "steps", "epoch_policies", "ordering",
                    "train_pairs", "untrained")
            return {k: rec[k] for k in keep if k in rec}
        return fn

    sft = run.stage(f"{name}/sft", train_policy("sft", sft_start, sft_trees),
                    lambda r: f"{r['sft_traces']} traces of {r['num_trees']} trees, {r['steps']} steps")
    cpl = run.stage(f"{name}/cpl", train_policy("dpo", sft["policy"], trees_dir, **{"policy_train.ordering": "cpl"}),
                    lambda r: f"{r.get('train_pairs', 0)} pairs, {r['steps']} steps")

    def evaluate(stage_dir):
        out = {"sft": evaluate_policy(cfg, run.root, sft["policy"], cfg.loop.sft_methods, stage_dir / "sft",
                                      mesh=run.mesh),
               "cpl": evaluate_policy(cfg, run.root, cpl["policy"], cfg.loop.cpl_methods, stage_dir / "cpl",
                                      mesh=run.mesh)}
        out["cpl_epochs"] = []
        for i, p in enumerate(cpl.get("epoch_policies") or []):
            if "greedy" in out["cpl"] and same_weights(p, cpl["policy"]):
                out["cpl_epochs"].append(out["cpl"]["greedy"])  # the final policy is this epoch's, scored above
            else:
                out["cpl_epochs"].append(evaluate_policy(cfg, run.root, p, ("greedy",),
                                                         stage_dir / f"cpl_epoch_{i + 1}", mesh=run.mesh)["greedy"])
        return out

    ev = run.stage(f"{name}/eval", evaluate, lambda r: f"SFT {_fmt(r['sft'])}; CPL {_fmt(r['cpl'])}")
    record = {
        "iteration": it,
        "synthesized_prompts": syn["kept"],
        "synthesis": syn,
        "search": srch,
        "sft": ev["sft"],
        "cpl": ev["cpl"],
        "cpl_epochs": ev["cpl_epochs"],
        "sft_traces": sft["sft_traces"],
        "pairs": cpl.get("pairs"),  # extracted, per kind
        "train_pairs": cpl.get("train_pairs"),  # what CPL trained on (the ordering's pair kinds)
        "policy": {"sft": sft, "cpl": cpl}[_next_policy_stage(cfg)]["policy"],
        # Why a round kept the policy it started from (nothing passed the critic's bar, no pair), or None:
        # its rows in the report then score that policy again.
        "untrained": {"sft": sft.get("untrained"), "cpl": cpl.get("untrained")},
    }
    mcts = find_method(ev["cpl"], "mcts")
    if mcts is not None:
        record["mcts"] = mcts
    # Greedy, paired on the same problems: SFT against the policy it started from, CPL against SFT.
    from alphallm_jax.pipeline.evaluation import predictions_path

    if it == 1 or sft_start == base_policy:
        start = run.root / "base_eval"
    else:
        start = run.root / f"iter_{it - 1}" / "eval" / _next_policy_stage(cfg)
    sft_greedy, cpl_greedy = (predictions_path(it_root / "eval" / k, "greedy") for k in ("sft", "cpl"))
    record["paired_greedy"] = {"sft": paired_comparison(predictions_path(start, "greedy"), sft_greedy),
                               "cpl": paired_comparison(sft_greedy, cpl_greedy)}
    return record, record["policy"]


def _next_policy_stage(cfg) -> str:
    """The stage ("sft" or "cpl") whose policy the next iteration starts from (`loop.next_policy`)."""
    if cfg.loop.next_policy not in ("sft", "cpl"):
        raise ValueError(f"loop.next_policy must be 'sft' or 'cpl', got {cfg.loop.next_policy!r}")
    return cfg.loop.next_policy


def same_weights(policy_a, policy_b) -> bool:
    """Whether two saved policies hold byte-identical weight files."""
    import filecmp

    files_a = sorted(p.name for p in as_path(policy_a).glob("*.safetensors"))
    files_b = sorted(p.name for p in as_path(policy_b).glob("*.safetensors"))
    return bool(files_a) and files_a == files_b and all(
        filecmp.cmp(as_path(policy_a) / f, as_path(policy_b) / f, shallow=False) for f in files_a)


def _iteration_cpl_run(run: LoopRun, ordering: str, seed: int) -> dict | None:
    """An ordering ablation's record taken from iteration 1's own CPL stage when it is the same run
    (the same SFT policy, trees, ordering and seed), or None: trained and scored once, not twice."""
    cfg = run.cfg
    if ordering != "cpl" or seed != int(cfg.policy_train.dpo.seed):
        return None
    cpl = read_stage_record(run.root / "iter_1" / "cpl", run.root)["record"]
    ev = read_stage_record(run.root / "iter_1" / "eval", run.root)["record"]
    if cpl.get("untrained") or not ev.get("cpl_epochs"):
        return None
    return {"ordering": ordering, "seed": seed, "epoch_accuracy": [r["accuracy"] for r in ev["cpl_epochs"]],
            "train_pairs": cpl.get("train_pairs"), "reused": "iter_1/cpl"}


def _ablations(run: LoopRun) -> dict:
    """Iteration 1's preference stage again with other pair orderings and seeds, from the same SFT
    policy and trees: greedy accuracy after every epoch (mean and spread over seeds)."""
    import statistics

    cfg = run.cfg
    it_root = run.root / "iter_1"
    sft_policy = read_stage_record(it_root / "sft", run.root)["record"]["policy"]
    trees_dir = str(it_root / "search" / "trees")
    table: dict[str, Any] = {}
    for ordering in cfg.loop.ablation_orderings:
        per_seed = []
        for s in range(cfg.loop.ablation_seeds):
            seed = cfg.seed + s

            def fn(stage_dir, ordering=ordering, seed=seed):
                from alphallm_jax.train.policy_training import run_policy_training

                reused = _iteration_cpl_run(run, ordering, seed)
                if reused is not None:
                    return reused
                c = derived_config(cfg, **{"model.checkpoint": sft_policy, "policy_train.trees_dir": trees_dir,
                                           "policy_train.ordering": ordering, "policy_train.dpo.seed": seed})
                rec = run_policy_training(c, stage_dir / "train", "dpo", mesh=run.mesh, allow_untrained=True)
                if rec.get("untrained"):  # e.g. Q pairs only: this ordering has nothing to order, as the table says
                    return {"ordering": ordering, "seed": seed, "epoch_accuracy": [], "train_pairs": 0,
                            "untrained": rec["untrained"]}
                epochs = [evaluate_policy(cfg, run.root, p, ("greedy",), stage_dir / f"epoch_{i + 1}",
                                          mesh=run.mesh)["greedy"]["accuracy"]
                          for i, p in enumerate(rec.get("epoch_policies") or [rec["policy"]])]
                return {"ordering": ordering, "seed": seed, "epoch_accuracy": epochs,
                        "train_pairs": rec.get("train_pairs")}

            per_seed.append(run.stage(f"ablations/{ordering}_seed{seed}", fn,
                                      lambda r: f"{r['ordering']}: " + (f"untrained, {r['untrained']}"
                                                if r.get("untrained") else "greedy per epoch " + ", ".join(
                                                    f"{100 * a:.1f}%" for a in r["epoch_accuracy"]))))
        # Means over the seeds that trained: one seed with nothing to train on (its "untrained" reason is
        # kept) must not hide the others' accuracies.
        trained = [r for r in per_seed if not r.get("untrained")]
        num_epochs = min((len(r["epoch_accuracy"]) for r in trained), default=0)
        table[ordering] = {
            "seeds": [r["seed"] for r in per_seed],
            "train_pairs": per_seed[0]["train_pairs"],
            "untrained": next((r["untrained"] for r in per_seed if r.get("untrained")), None),
            "epochs": [{"epoch": e + 1,
                        "mean": statistics.fmean(r["epoch_accuracy"][e] for r in trained),
                        "spread": (max(r["epoch_accuracy"][e] for r in trained)
                                   - min(r["epoch_accuracy"][e] for r in trained))}
                       for e in range(num_epochs)],
        }
        if trained and len(trained) < len(per_seed):
            table[ordering]["trained_seeds"] = [r["seed"] for r in trained]
    return table
