"""The evaluation harness: a checkpoint, a dataset split and a list of methods -> graded artifacts.

Problems are sharded over JAX processes (`jax.process_index()`; on a mesh spanning processes every
process runs every problem in lockstep and process 0 alone writes); each process appends its graded
rows to its own part file (resumable: a rerun skips finished problems, a torn last line from a kill
is dropped), then process 0 merges the parts into `predictions.jsonl` per method, `summary.json`,
`summary.md` and `accuracy_vs_tokens.png`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re

import jax
from tqdm import tqdm

from alphallm_jax.data.grading import answers_equal, extract_answer
from alphallm_jax.data.loaders import is_named_split, load_dataset
from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import fewshot_exemplars, format_prompt, question_key, step_separator
from alphallm_jax.pipeline import reporting
from alphallm_jax.pipeline.eval_methods import EvalContext, make_method, method_specs, sample_budget
from alphallm_jax.utils.distributed import (
    barrier,
    broadcast_int,
    coordinator_flags,
    is_coordinator,
    spans_processes,
    sum_over_processes,
    this_process_share,
    writes_results,
)
from alphallm_jax.utils.io import (
    append_jsonl,
    as_path,
    atomic_write_json,
    atomic_write_text,
    files_fingerprint,
    read_json,
    read_jsonl_tolerant_tail,
    write_jsonl_atomic,
)
from alphallm_jax.utils.run_identity import check_run_identity

log = logging.getLogger(__name__)


def method_dirname(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec)


def dataset_options(cfg) -> dict:
    """The loader settings a config gives every split and exemplar pool: the data root and the arith
    generator's seed and configs (`load_dataset`'s keywords)."""
    from alphallm_jax.data.arith import ArithConfig

    return dict(data_dir=cfg.data.data_dir or None, arith_seed=cfg.seed, arith_config=ArithConfig(**cfg.data.arith),
                arith_hard_config=ArithConfig(**cfg.data.arith_hard))


def load_split(cfg, split: str, limit: int = 0, *, graded: bool = True) -> list[Problem]:
    """A named split or JSONL file as the config describes it (data root, task, arith knobs and seed).
    `graded=False`: problems only compared as text (imagination's test-overlap check), whose split may be
    another task's."""
    return load_dataset(split, limit=limit or None, task=cfg.task if graded else None, **dataset_options(cfg))


def load_eval_problems(cfg) -> list[Problem]:
    return load_split(cfg, cfg.eval.split, cfg.eval.limit)


def eval_split_problems(cfg) -> list[Problem]:
    """Every problem of `eval.split` (`eval.limit` aside), which no few-shot exemplar may be; a JSONL path not
    written yet holds none."""
    split = cfg.eval.split.strip()
    if not split or not (is_named_split(split) or as_path(split).exists()):
        return []
    return load_split(cfg, split)


def config_exemplars(cfg, task: str) -> list[Problem]:
    """The `fewshot` exemplars of `task` under `cfg`: `data.num_exemplars` drawn with `data.exemplar_seed`
    from the task's train split as the config generates or locates it (for arith: `seed`, `data.arith`),
    leaving out the problems of `eval.split` (math:train4500 lies inside math:test5000)."""
    return fewshot_exemplars(task, cfg.data.num_exemplars, cfg.data.exemplar_seed, exclude=eval_split_problems(cfg),
                             **dataset_options(cfg))


def without_exemplars(cfg, problems: list[Problem]) -> list[Problem]:
    """`problems` less the `fewshot` exemplars' own questions (all of them under another format): a split
    the exemplars are drawn from (D0, the critics' train prompts) would otherwise ask a prompt to hold its
    own problem as an exemplar, which `format_prompt` refuses."""
    if cfg.data.prompt_format != "fewshot" or not problems:
        return problems
    exemplar_questions = {question_key(ex.question) for ex in config_exemplars(cfg, problems[0].task)}
    kept = [p for p in problems if question_key(p.question) not in exemplar_questions]
    if len(kept) < len(problems):
        log.info("left %d few-shot exemplar(s) out of %d problems", len(problems) - len(kept), len(problems))
    return kept


def prompt_builder(cfg, tokenizer):
    fmt = cfg.data.prompt_format
    exemplars_of: dict[str, list[Problem]] = {}  # by task: a config's exemplars are the same for every problem

    def prompt_for(problem: Problem) -> str:
        exemplars = None
        if fmt == "fewshot":
            if problem.task not in exemplars_of:
                exemplars_of[problem.task] = config_exemplars(cfg, problem.task)
            exemplars = exemplars_of[problem.task]
        return format_prompt(problem, fmt, exemplars, tokenizer=tokenizer)

    return prompt_for


def predictions_path(workdir, spec: str, tag: str = "eval"):
    """The merged predictions file of `spec` that `evaluate_methods(..., workdir, tag=tag)` writes
    (`merge_results`)."""
    return _merged_path(as_path(workdir) / tag, spec)


def _merged_path(out_root, spec: str):
    return out_root / method_dirname(spec) / "predictions.jsonl"


def _part_path(out_root, spec: str, mesh=None):
    """This process's predictions file of `spec` (merged into predictions.jsonl by process 0); on a mesh
    spanning processes, the one file of every process's shared share (process 0 writes it)."""
    pidx, pcount = (0, 1) if spans_processes(mesh) else (jax.process_index(), jax.process_count())
    return out_root / method_dirname(spec) / f"predictions.part{pidx:03d}-of-{pcount:03d}.jsonl"


# Settings a resumed evaluation may change: which methods run and how many problems (a problem's result
# depends on its own seed only), and the KV pool a paper preset sizes for its mesh (a run resumed on
# another mesh, which the loop allows, gets another pool; it changes which states are cached, not what
# is sampled).
RESUMABLE_EVAL_KEYS = ("eval.methods", "eval.limit", "search.pool_slots")
# Recorded since few-shot exemplars follow the run's seed and arith generator: a few-shot folder written
# before has no record of the exemplars its prompts held, so it is refused, not resumed.
REQUIRED_EVAL_KEYS = ("prompt.exemplars",)


def prompt_identity(cfg) -> dict:
    """The settings that shape every prompt, and for `fewshot` the exemplars themselves by content: they
    follow `seed` and `data.arith` (arith) or the train file under `data.data_dir`, a path that is left out
    so that a workdir moved with its data to another machine still resumes."""
    identity = {k: cfg.data[k] for k in ("prompt_format", "num_exemplars", "exemplar_seed")}
    if cfg.data.prompt_format == "fewshot":
        exemplars = [[p.id, p.question, p.solution, p.answer] for p in config_exemplars(cfg, cfg.task)]
        identity["exemplars"] = hashlib.sha256(json.dumps(exemplars).encode()).hexdigest()
    return identity


def problem_set_identity(cfg) -> dict:
    """The arith generator's settings where the eval split is generated from them (`seed` is recorded on its
    own). A split read from files is checked by its rows' questions and references (`_check_same_problems`)."""
    task, _, split = cfg.eval.split.strip().partition(":")
    if task != "arith":
        return {}
    # test is generated first, from data.arith alone; every later split excludes the questions before it.
    keys = ("arith",) if split == "test" else ("arith", "arith_hard")
    return {"data": {k: cfg.data[k].to_dict() for k in keys}}


def eval_identity(cfg, checkpoint, methods=(), workdir=None) -> dict:
    """What an evaluation's per-problem results depend on besides the method's spec: the policy's files by
    content (a moved or copied workdir still resumes; a retrained policy at the same path does not), the
    critic's (with the settings that shape its scores) and what rollouts come from where `methods` roll
    out (`workdir` locates them), and the settings that shape prompts (`prompt_identity`), the problem set
    (`problem_set_identity`), sampling and search. (The problems themselves are checked row by row on
    resumption, `_check_same_problems`.)"""
    from alphallm_jax.pipeline.search_methods import CRITIC_METHODS
    from alphallm_jax.pipeline.search_run import critic_dir, critic_settings, rollout_identity

    def plain(section):
        return section.to_dict() if hasattr(section, "to_dict") else section

    identity = {"policy": files_fingerprint(checkpoint), "task": cfg.task, "seed": cfg.seed,
                "eval": plain(cfg.eval), "search": plain(cfg.search), "prompt": prompt_identity(cfg),
                **problem_set_identity(cfg)}
    names = {spec.partition("@")[0] for spec in methods}
    if names & set(CRITIC_METHODS):
        identity["critic"] = files_fingerprint(critic_dir(cfg, workdir))
        identity["critic_settings"] = critic_settings(cfg)
    return {**identity, **rollout_identity(cfg, workdir, methods)}


def evaluate_methods(problems: list[Problem], ctx: EvalContext, methods, workdir, *, batch_size: int,
                     tag: str = "eval", identity: dict | None = None) -> dict:
    """Run `methods` (spec strings) on this process's share of `problems`; merge on process 0. With
    `identity` (`eval_identity`), a workdir holding another evaluation's results is refused, not resumed.

    Returns the merged summary on every process (the others read what process 0 wrote).
    """
    methods = method_specs(methods)
    mesh = getattr(ctx.sampler, "mesh", None)
    mine = this_process_share(problems, mesh)
    out_root = as_path(workdir) / tag
    if identity is not None:
        check_run_identity(out_root, identity, resumable=RESUMABLE_EVAL_KEYS, required=REQUIRED_EVAL_KEYS)
    # Sampled methods share one draw of the largest budget (`eval_methods._sample`).
    ctx.components["sample_budget"] = sample_budget(methods)
    for spec in methods:
        method = make_method(spec)
        part = _part_path(out_root, spec, mesh)
        done_rows, _ = read_jsonl_tolerant_tail(part, repair=writes_results(mesh))
        # A run resumed with another process count finds its finished problems in the old count's part
        # files, which the merge reads too.
        mine_ids = {p.id for p in mine}
        for other in sorted(part.parent.glob("predictions.part*.jsonl")):
            if other != part:
                done_rows += [r for r in read_jsonl_tolerant_tail(other)[0] if r["id"] in mine_ids]
        done = {r["id"] for r in done_rows}
        if spans_processes(mesh):
            # In lockstep process 0's reading decides: its refusal stops every process (none is left
            # waiting in a collective), and every process skips what it finds finished.
            refusal = None
            if is_coordinator():
                try:
                    _check_same_problems(part, done_rows, mine)
                except ValueError as e:
                    refusal = e
            if broadcast_int(refusal is not None):
                raise refusal or ValueError(f"{part}: process 0 refused to resume these results (see its log)")
            done = {p.id for p, f in zip(mine, coordinator_flags([p.id in done for p in mine], mesh)) if f}
        else:
            # Each process checks its own share; a refusal anywhere stops every process here, rather than
            # leaving the others waiting at the next barrier.
            refusal = None
            try:
                _check_same_problems(part, done_rows, mine)
            except ValueError as e:
                refusal = e
            if sum_over_processes({"refused": int(refusal is not None)})["refused"]:
                raise refusal or ValueError(f"{part.parent}: another process refused to resume its results "
                                            f"(see its log)")
        # Fixed batches of this process's problems, a started one run again whole (only its missing rows
        # written): a batch's floats depend on its shapes, so only the same batch gives a resumed run (after
        # a torn write, or with a larger eval.limit) the rows an uninterrupted run writes.
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        left = sum(p.id not in done for p in mine)
        with tqdm(total=len(mine), initial=len(mine) - left, desc=f"{tag} {spec}", unit="problem") as bar:
            for batch in batches:
                if all(p.id in done for p in batch):
                    continue
                rows = [_grade(p, out, spec, ctx.task) for p, out in zip(batch, method.run(batch, ctx))
                        if p.id not in done]
                if writes_results(mesh):
                    append_jsonl(part, rows, many=True)
                bar.update(len(rows))
    barrier(f"{tag}:parts-written")
    summary, failure = {}, None
    if is_coordinator():
        try:
            summary = merge_results(problems, methods, out_root)
        except (ValueError, OSError) as e:  # every process stops with it, none waits at the barrier
            failure = e
    if broadcast_int(failure is not None):
        raise failure or RuntimeError(f"{out_root}: process 0 could not merge the results (see its log)")
    barrier(f"{tag}:merged")
    if not is_coordinator():  # the workdir is shared (a local disk or a bucket): every process reads the merge
        summary = read_json(out_root / "summary.json")["methods"]
    return summary


def _check_same_problems(part, rows, problems: list[Problem]) -> None:
    """Finished rows resume only for the problems they graded: ids name problems by split and index, so a
    changed generator (`data.arith`) or dataset reuses them for other questions."""
    by_id = {p.id: p for p in problems}
    for r in rows:
        p = by_id.get(r["id"])
        if p is not None and (r.get("question"), r.get("reference")) != (p.question, p.answer):
            raise ValueError(f"{part}: problem {p.id!r} was evaluated on another question or reference "
                             f"({r.get('question')!r}, {r.get('reference')!r} there; {p.question!r}, "
                             f"{p.answer!r} now: another dataset or generator); use a new workdir, or remove "
                             f"{part.parent}")


def seed_results(problems: list[Problem], spec: str, rows, workdir, *, tag: str = "eval", mesh=None) -> int:
    """Results of `spec` computed by an earlier run of the same method, config and seeds (e.g. on a
    superset of `problems`), written as this process's finished share (`mesh`: the evaluation's, see
    `this_process_share`), so that `evaluate_methods` resumes past them instead of recomputing. Only a
    part file that does not exist yet is written; returns the number of rows written."""
    part = _part_path(as_path(workdir) / tag, spec, mesh)
    if part.exists() or not writes_results(mesh):
        return 0
    by_id = {r["id"]: r for r in rows}
    mine = [by_id[p.id] for p in this_process_share(problems, mesh) if p.id in by_id]
    if mine:
        append_jsonl(part, mine, many=True)
    return len(mine)


def _grade(problem: Problem, out, spec: str, task: str) -> dict:
    extracted = extract_answer(out.prediction, task)
    correct = answers_equal(extracted, problem.answer, task)
    return {
        "id": problem.id,
        "method": spec,
        "question": problem.question,
        "reference": problem.answer,
        "prediction": out.prediction,
        "extracted": extracted,
        "correct": correct,
        "correct_strict": _strict(out.prediction, correct, task),
        "generated_tokens": out.generated_tokens,
        "nodes": out.nodes,
        **({"extra": out.extra} if out.extra else {}),
    }


def _strict(prediction: str, correct: bool, task: str) -> bool:
    """Right under strict-match: right, and the answer is marked as final (`####`, a box, "the answer
    is"), not read off the last number (the marked answer is the one the flexible grading read)."""
    return bool(correct) and extract_answer(prediction, task, strict=True) is not None


def merge_results(problems: list[Problem], methods, out_root) -> dict:
    """Merge every process's part files into per-method predictions and one summary."""
    order = {p.id: i for i, p in enumerate(problems)}
    summary = {}
    for spec in methods:
        method_dir = out_root / method_dirname(spec)
        rows = {}
        for part in sorted(method_dir.glob("predictions.part*.jsonl")):
            for row in read_jsonl_tolerant_tail(part)[0]:
                rows.setdefault(row["id"], row)  # one result per problem (`evaluate_methods` skips finished ones)
        missing = [p.id for p in problems if p.id not in rows]
        if missing:
            raise RuntimeError(f"{spec}: {len(missing)} problems have no result (first: {missing[:3]}); "
                               "a process did not finish: rerun to resume")
        merged = sorted((rows[p.id] for p in problems), key=lambda r: order[r["id"]])
        for p, row in zip(problems, merged, strict=True):  # rows written before strict-match was recorded
            if "correct_strict" not in row:
                row["correct_strict"] = _strict(row["prediction"], row["correct"], p.task)
        write_jsonl_atomic(_merged_path(out_root, spec), merged)
        summary[spec] = reporting.summarize(merged)
    atomic_write_json(out_root / "summary.json", {"methods": summary, "num_problems": len(problems)})
    atomic_write_text(out_root / "summary.md", reporting.markdown_table(summary, title=f"{out_root.name}"))
    families: dict[str, list] = {}
    for spec, s in summary.items():
        families.setdefault(spec.split("@")[0], []).append((max(s["mean_generated_tokens"], 1.0), s["accuracy"]))
    reporting.plot_accuracy_vs_compute(families, out_root / "accuracy_vs_tokens.png",
                                       title=f"accuracy vs compute ({len(problems)} problems)")
    return summary


def eval_stops(task: str, stops) -> tuple[str, ...]:
    """`eval.stop` for `task` less the task's step separator (`step_separator`): MATH writes one step per
    paragraph, so the default stop "\\n\\n" would end every MATH solution after its first step."""
    stops = tuple(stops)
    sep = step_separator(task)
    if sep not in stops:
        return stops
    kept = tuple(s for s in stops if s != sep)
    log.info("eval.stop: dropped %r, the %s step separator (it would end a solution after one step); stops %r",
             sep, task, kept)
    return kept


def eval_context(cfg, model, tokenizer, *, mesh=None) -> tuple[list[Problem], EvalContext]:
    """The config's eval problems and a context whose sampler fits their longest prompt; its `eval_cfg` is
    `cfg.eval` with the stops `eval_stops` keeps."""
    from alphallm_jax.sampling import sampler_from_config

    problems = load_eval_problems(cfg)
    prompt_for = prompt_builder(cfg, tokenizer)
    longest_prompt = max(len(tokenizer.encode(prompt_for(p), add_bos=True)) for p in problems)
    sampler = sampler_from_config(cfg, model, tokenizer, max_len=longest_prompt + cfg.eval.max_new_tokens, mesh=mesh)
    eval_cfg = cfg.eval.copy_and_resolve_references()
    eval_cfg.stop = eval_stops(cfg.task, cfg.eval.stop)
    return problems, EvalContext(sampler=sampler, task=cfg.task, prompt_for=prompt_for, eval_cfg=eval_cfg,
                                 seed=cfg.seed)


def evaluate_checkpoint(cfg, workdir, checkpoint, methods, out_dir, *, mesh=None,
                        tag: str = "eval") -> tuple[dict, EvalContext]:
    """`methods` on the config's eval split with the policy at `checkpoint`, results under `out_dir`; the
    critics (orm@k, prm@k, mcts, beam) and the search backend come from `workdir`, loaded only when a
    method needs them. Returns (the merged summary, the context)."""
    from alphallm_jax.models.loading import load_policy
    from alphallm_jax.pipeline.search_methods import eval_components

    methods = method_specs(methods)
    model, tokenizer = load_policy(cfg, checkpoint, mesh=mesh)
    problems, ctx = eval_context(cfg, model, tokenizer, mesh=mesh)
    ctx.components.update(eval_components(cfg, workdir, list(methods), model, tokenizer,
                                          [ctx.prompt_for(p) for p in problems], mesh=mesh))
    summary = evaluate_methods(problems, ctx, list(methods), out_dir, batch_size=cfg.eval.batch_size, tag=tag,
                               identity=eval_identity(cfg, checkpoint, methods, workdir))
    return summary, ctx


def run_eval_from_config(cfg, workdir) -> dict:
    """`alphallm eval`: load the checkpoint and the split named by the config and evaluate."""
    from alphallm_jax.config import mesh_from_config

    if not cfg.model.checkpoint:
        raise ValueError("config key model.checkpoint is empty: set --config.model.checkpoint=DIR")
    summary, ctx = evaluate_checkpoint(cfg, workdir, cfg.model.checkpoint, cfg.eval.methods, workdir,
                                       mesh=mesh_from_config(cfg))
    if is_coordinator():
        atomic_write_json(as_path(workdir) / "eval" / "config.json", cfg.to_dict())
    return {"summary": summary, "sampler_stats": dataclasses.asdict(ctx.sampler.stats)}
