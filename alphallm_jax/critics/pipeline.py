"""`alphallm train-critics`: rollouts on labelled D0 -> critic training -> calibration -> best-of-k eval.

Stages under WORKDIR/critics, each skipped when its artifact is complete (a rerun resumes):
  1. the policy: `critics.policy`, else WORKDIR/base/policy (trained by `train-base` code if missing);
  2. `data/train`, `data/dev`: MC rollout rows (`critics.data`), resumable chunk by chunk;
  3. the fast-rollout policy (WORKDIR/fast_rollout) when `rollout_policy.enabled`; the critic's backbone
     when `critics.model.init="rollout_policy"`;
  4. `train/` (trainer checkpoints, metrics) -> `critic/` (orbax critic + tokenizer + DONE);
  4b. `critic/combiner.json`: the outcome combiner (`critics.combiner`), fitted on the train trajectories;
  5. `calibration.json` / `calibration.md`: precision, recall, ECE, AUROC per critic on the dev rows;
  6. `eval/`: `critics.eval_methods` (greedy, maj@k, orm@k, prm@k, pass@k) on `eval.split`.
`timings.json` records each stage's wall and CPU seconds in this run (a skipped stage takes ~0 s).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import numpy as np

from alphallm_jax.critics.combiner import COMBINER_FILE, OutcomeCombiner, rows_mean_logprobs, solution_features
from alphallm_jax.critics.data import (
    DONE,
    RolloutConfig,
    build_rollout_data,
    critic_examples,
    row_solution_ids,
    row_tokens,
)
from alphallm_jax.critics.losses import collate_critic, critic_example_length, make_critic_loss
from alphallm_jax.critics.positions import blank_token_ids
from alphallm_jax.critics.report import calibration_report, report_markdown
from alphallm_jax.critics.scoring import CriticScorer
from alphallm_jax.critics.tools import ToolConfig
from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.critic import (
    CriticHeadConfig,
    CriticModel,
    create_critic,
    critic_from_policy,
    load_critic,
    save_critic,
)
from alphallm_jax.utils.distributed import barrier, broadcast_int, check_sampling_mesh, is_coordinator
from alphallm_jax.utils.io import as_path, atomic_write_json, atomic_write_text, files_fingerprint, read_json
from alphallm_jax.utils.run_identity import check_run_identity

log = logging.getLogger(__name__)
BACKBONE_INITS = ("policy", "rollout_policy", "checkpoint", "scratch")


def critics_dir(workdir):
    return as_path(workdir) / "critics"


def resolve_policy(cfg, workdir, *, mesh=None):
    """The policy directory whose rollouts label the data (the demo's base policy is trained if missing)."""
    if cfg.critics.policy:
        path = as_path(cfg.critics.policy)
        if not path.exists():
            raise FileNotFoundError(f"critics.policy={cfg.critics.policy} does not exist")
        return path
    path = as_path(workdir) / "base" / "policy"
    if not (path / DONE).exists():
        from alphallm_jax.pipeline.base_policy import train_base_policy

        log.info("no base policy at %s: training it first (alphallm train-base)", path)
        train_base_policy(cfg, workdir, mesh=mesh)
    return path


def build_data(cfg, workdir, policy, tokenizer, *, mesh=None) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows) from the policy's rollouts on the critics' train and dev prompts."""
    from alphallm_jax.pipeline.evaluation import load_split, prompt_builder, without_exemplars
    from alphallm_jax.sampling import sampler_from_config

    data_cfg = RolloutConfig.from_config(cfg.critics.data)
    prompt_for = prompt_builder(cfg, tokenizer)
    train = without_exemplars(cfg, load_split(cfg, cfg.critics.train_split, cfg.critics.num_train_prompts))
    dev = without_exemplars(cfg, load_split(cfg, cfg.critics.dev_split, cfg.critics.num_dev_prompts))
    longest = max(len(tokenizer.encode(prompt_for(p), add_bos=True)) for p in train + dev)
    sampler = sampler_from_config(cfg, policy, tokenizer, max_len=longest + data_cfg.max_new_tokens,
                                  pool_slots=data_cfg.pool_slots, mesh=mesh)
    root = critics_dir(workdir) / "data"
    train_rows = build_rollout_data(sampler, train, prompt_for, data_cfg, root / "train", task=cfg.task,
                                    seed=cfg.seed, desc="critic data (train)")
    dev_rows = build_rollout_data(sampler, dev, prompt_for, data_cfg, root / "dev", task=cfg.task,
                                  seed=cfg.seed + 1, desc="critic data (dev)")
    return train_rows, dev_rows


def make_critic(cfg, policy, tokenizer, *, mesh=None, workdir=None) -> CriticModel:
    """A fresh critic with the configured backbone (`critics.model.init`)."""
    m = cfg.critics.model
    heads = CriticHeadConfig(hidden=m.head_hidden, activation=m.head_activation)
    if m.init == "policy":
        return critic_from_policy(policy, heads, seed=cfg.seed, mesh=mesh)
    if m.init in ("checkpoint", "rollout_policy"):
        from alphallm_jax import load_pretrained
        from alphallm_jax.critics.fast_rollout import fast_policy_dir

        if m.init == "checkpoint" and not m.checkpoint:
            raise ValueError("critics.model.init='checkpoint' needs critics.model.checkpoint")
        path = m.checkpoint if m.init == "checkpoint" else fast_policy_dir(cfg, workdir)
        if m.init == "rollout_policy" and not (as_path(path) / DONE).exists() and not cfg.rollout_policy.checkpoint:
            raise FileNotFoundError(f"critics.model.init='rollout_policy': no fast-rollout policy at {path} "
                                    "(set rollout_policy.enabled=True, or rollout_policy.checkpoint)")
        backbone, backbone_tokenizer = load_pretrained(path, dtype=m.dtype, mesh=mesh)
        if backbone_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"critic backbone {path} has another tokenizer "
                             f"({backbone_tokenizer.vocab_size} vs the policy's {tokenizer.vocab_size} tokens)")
        return critic_from_policy(backbone, heads, seed=cfg.seed, mesh=mesh)
    if m.init == "scratch":
        p = policy.cfg
        model_cfg = ModelConfig(
            vocab_size=p.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
            rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
            tie_word_embeddings=m.tie_word_embeddings, bos_token_id=p.bos_token_id, eos_token_ids=p.eos_token_ids,
            pad_token_id=p.pad_token_id, dtype=m.dtype)
        return create_critic(model_cfg, heads, mesh=mesh, seed=cfg.seed)
    raise ValueError(f"critics.model.init={m.init!r}; choose from {BACKBONE_INITS}")


def train_critic(cfg, workdir, train_rows, dev_rows, policy, tokenizer, *, mesh=None) -> tuple[CriticModel, dict]:
    """Trains (or resumes, or loads) the critic; returns it and its training record."""
    from alphallm_jax.sampling.token_texts import token_texts
    from alphallm_jax.train.trainer import TrainConfig, Trainer

    out = critics_dir(workdir) / "critic"
    if broadcast_int((out / DONE).exists()):
        return load_critic(out, mesh=mesh), read_json(critics_dir(workdir) / "critic_train.json")
    train_cfg = TrainConfig.from_config(cfg.critics.train)
    blank = blank_token_ids(token_texts(tokenizer, policy.cfg.vocab_size),
                            set(policy.cfg.eos_token_ids) | set(tokenizer.eos_ids) | {tokenizer.pad_id})
    critic = make_critic(cfg, policy, tokenizer, mesh=mesh, workdir=workdir)
    _check_critic_positions(cfg, critic, train_rows + dev_rows)
    loss = cfg.critics.loss
    make = functools.partial(critic_examples, blank_ids=blank, prm_label=cfg.critics.prm_label,
                             value_at_root=cfg.critics.value_at_root, max_seq_len=train_cfg.max_seq_len,
                             pairs=loss.orm_rank_weight > 0, seed=cfg.seed)
    train_examples = make(_subsample_rollouts(train_rows, cfg.critics.rollout_row_fraction, cfg.seed))
    dev_examples = make(_subsample_rollouts(dev_rows, cfg.critics.rollout_row_fraction, cfg.seed + 1))
    if not train_examples:
        raise ValueError("no critic training examples (every row was longer than critics.train.max_seq_len?)")
    trainer = Trainer(critic, make_critic_loss((loss.value_weight, loss.prm_weight, loss.orm_weight), loss.value,
                                               loss.orm_rank_weight),
                      train_cfg, mesh=mesh, workdir=str(critics_dir(workdir) / "train"),
                      collate_fn=functools.partial(collate_critic, max_seq_len=train_cfg.max_seq_len,
                                                   pad_to_multiple=train_cfg.pad_to_multiple),
                      length_fn=critic_example_length)
    start = time.time()
    fit = trainer.fit(train_examples, dev_examples or None)
    save_critic(critic, out, tokenizer=tokenizer)
    record = {"train_examples": len(train_examples), "dev_examples": len(dev_examples), "steps": fit.step,
              "best_step": fit.best_step, "best_dev_loss": fit.best_dev_loss, "stopped_early": fit.stopped_early,
              "dev_metrics": fit.dev_metrics, "fit_seconds": time.time() - start,
              "backbone": cfg.critics.model.init, "param_count": critic.model_cfg.param_count()}
    if is_coordinator():
        atomic_write_json(critics_dir(workdir) / "critic_train.json", record)
        atomic_write_text(out / DONE, "ok\n")
    barrier(f"critic:{out}")
    return critic, record


def _check_critic_positions(cfg, critic: CriticModel, rows: list[dict]) -> None:
    """The outcome combiner's fit and calibration score the critic data's rows whole: a critic with fewer
    positions than the longest row would fail there, after its training. Refused before."""
    longest = max((len(row_tokens(r)) for r in rows), default=0)
    positions = critic.model_cfg.max_position_embeddings
    if longest > positions:
        fix = ("raise critics.model.max_position_embeddings" if cfg.critics.model.init == "scratch"
               else "use a backbone with more positions")
        raise ValueError(
            f"the critic data's longest row holds {longest} tokens (its prompt and up to critics.data.max_new_tokens="
            f"{cfg.critics.data.max_new_tokens} generated), more than the {positions} positions of the critic "
            f"(critics.model.init={cfg.critics.model.init!r}), which scores whole rows: lower "
            f"critics.data.max_new_tokens (and rebuild the critic data) or {fix}")


def _subsample_rollouts(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """Every trajectory row and a seeded `fraction` of the (ORM-only) rollout rows."""
    if fraction >= 1.0:
        return rows
    keep = np.random.default_rng(seed).random(len(rows)) < fraction
    return [r for r, k in zip(rows, keep) if k or r["kind"] == "trajectory"]


def tool_config(cfg) -> ToolConfig:
    """`critics.tools` as a ToolConfig, checked against the prompt format: the checks that read the
    question find it in a plain or fewshot prompt only. The loop calls this before its first stage."""
    tools = ToolConfig.from_config(cfg.critics.tools)
    if tools.needs_question and cfg.data.prompt_format == "chat":
        raise ValueError("critics.tools.question_numbers and critics.tools.operand_sources read the question "
                         "from a plain or fewshot prompt; data.prompt_format='chat' renders it through the "
                         "tokenizer's template. Turn those checks off, or use 'plain' or 'fewshot'")
    return tools


def make_scorer(cfg, critic, tokenizer, *, mesh=None, combiner: OutcomeCombiner | None = None) -> CriticScorer:
    check_sampling_mesh(mesh)
    s = cfg.critics.scoring
    return CriticScorer(critic, tokenizer, task=cfg.task, max_batch=s.max_batch, len_granule=s.len_granule,
                        min_rows=s.min_rows, fine_row_buckets=s.fine_row_buckets, mesh=mesh,
                        tools=tool_config(cfg), prm_aggregate=s.prm_aggregate, combiner=combiner)


def load_combiner(cfg, critic_path) -> OutcomeCombiner | None:
    """The critic's outcome combiner when `critics.combiner.enabled` and one was fitted (else None)."""
    path = as_path(critic_path) / COMBINER_FILE
    if not cfg.critics.combiner.enabled or not path.exists():
        return None
    return OutcomeCombiner.load(path)


def fit_combiner(cfg, workdir, scorer: CriticScorer, train_rows) -> OutcomeCombiner | None:
    """Fits (or loads) the outcome combiner on the train split's trajectories; writes critic/combiner.json."""
    path = critics_dir(workdir) / "critic" / COMBINER_FILE
    if not cfg.critics.combiner.enabled:
        return None
    if broadcast_int(path.exists()):
        return OutcomeCombiner.load(path)
    trajs = [r for r in train_rows if r["kind"] == "trajectory"]
    mean_lp = rows_mean_logprobs(trajs)
    if mean_lp is None:
        log.warning("critic data under %s has no step_logprobs (built by an older version): no outcome combiner; "
                    "delete critics/data to rebuild it", critics_dir(workdir) / "data")
        return None
    labels = np.asarray([float(r["correct"]) for r in trajs])
    if not 0 < float(np.mean(labels)) < 1:
        log.warning("every train trajectory is %s: no outcome combiner to fit", "right" if labels[0] else "wrong")
        return None
    sol = scorer.score_solutions([r["prompt_ids"] for r in trajs], [row_solution_ids(r) for r in trajs],
                                 [r["text"] for r in trajs])
    combiner = OutcomeCombiner.fit(solution_features(sol.orm, sol.tool_ok, mean_lp), labels,
                                   l2=cfg.critics.combiner.l2)
    if is_coordinator():
        combiner.save(path)
    barrier(f"combiner:{path}")
    # Process 0's fit on every process: its features hold checks under a wall-clock budget.
    return combiner if is_coordinator() else OutcomeCombiner.load(path)


# What the critics stage may rerun with, changed: where its outputs go, how they are reported, and what a
# preset sizes for its mesh (a cache size, how a train step is split or recomputed).
_CRITICS_NEUTRAL_KEYS = ("policy", "checkpoint", "eval_methods", "eval_limit", "calibration", "scoring")


def critics_identity(cfg, policy_dir) -> dict:
    """What the critic data, the critic and its combiner depend on: the policy's files, the task, seed,
    prompt settings and every critics setting but bookkeeping (`_CRITICS_NEUTRAL_KEYS`, the data's KV pool,
    the train section's bookkeeping; the policy by its files, not its path)."""
    from alphallm_jax.pipeline.evaluation import prompt_identity
    from alphallm_jax.train.trainer import TRAIN_BOOKKEEPING_KEYS

    critics = {k: v for k, v in cfg.critics.to_dict().items() if k not in _CRITICS_NEUTRAL_KEYS}
    critics["data"] = {k: v for k, v in critics["data"].items() if k != "pool_slots"}
    critics["train"] = {k: v for k, v in critics["train"].items() if k not in TRAIN_BOOKKEEPING_KEYS}
    return {"policy": files_fingerprint(policy_dir), "task": cfg.task, "seed": cfg.seed,
            "prompt": prompt_identity(cfg), "critics": critics}


def run_train_critics(cfg, workdir) -> dict:
    """Every stage (see the module doc); returns a summary of what was measured."""
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.models.loading import load_policy

    mesh = mesh_from_config(cfg)
    check_sampling_mesh(mesh)  # rollouts and scoring follow: refused before the base policy may train
    root = critics_dir(workdir)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        # Wall time and this process's CPU time (all threads): on a shared machine the second says
        # what the stage costs when other jobs steal the cores.
        start, cpu = time.time(), time.process_time()
        out = fn(*args, **kwargs)
        jax.effects_barrier()
        timings[name] = round(time.time() - start, 2)
        timings[f"{name}_cpu"] = round(time.process_time() - cpu, 2)
        return out

    policy_dir = timed("policy", resolve_policy, cfg, workdir, mesh=mesh)
    # A rerun reuses the data, the critic and the combiner only of this policy and these settings:
    # `alphallm train-critics` has no run config of its own to guard it, as the loop's config.json does.
    check_run_identity(root, critics_identity(cfg, policy_dir))
    policy, tokenizer = load_policy(cfg, policy_dir, mesh=mesh)
    train_rows, dev_rows = timed("data", build_data, cfg, workdir, policy, tokenizer, mesh=mesh)
    fast = None
    if cfg.rollout_policy.enabled:  # first: the critic's backbone may be the fast-rollout policy
        from alphallm_jax.critics.fast_rollout import train_fast_rollout_policy

        fast = timed("fast_rollout_policy", train_fast_rollout_policy, cfg, workdir, policy_dir, mesh=mesh)
    critic, train_record = timed("train", train_critic, cfg, workdir, train_rows, dev_rows, policy, tokenizer,
                                 mesh=mesh)
    scorer = make_scorer(cfg, critic, tokenizer, mesh=mesh)
    scorer = scorer.with_combiner(timed("combiner", fit_combiner, cfg, workdir, scorer, train_rows))
    cal = cfg.critics.calibration
    report = timed("calibration", calibration_report, scorer, dev_rows, threshold=cal.threshold,
                   num_bins=cal.num_bins, bootstrap=cal.bootstrap)
    if is_coordinator():  # every process scored the same dev rows
        atomic_write_json(root / "calibration.json", report)
        atomic_write_text(root / "calibration.md", report_markdown(report))

    summary = None
    if cfg.critics.eval_methods:
        summary = timed("eval", evaluate_with_critic, cfg, workdir, policy, tokenizer, scorer, mesh=mesh)
    if is_coordinator():
        atomic_write_json(root / "timings.json", timings)
    return {"calibration": report, "train": train_record, "eval": summary, "timings": timings,
            "fast_rollout_policy": fast}


def evaluate_with_critic(cfg, workdir, policy, tokenizer, scorer: CriticScorer, *, mesh=None) -> dict:
    """`critics.eval_methods` on `eval.split` (first `critics.eval_limit` problems) with this critic, through
    the components `alphallm eval` builds (the search methods get the config's search settings and the
    fast-rollout policy); methods with the same k share one set of samples."""
    from alphallm_jax.pipeline.evaluation import eval_context, evaluate_methods
    from alphallm_jax.pipeline.search_methods import eval_components

    problems, ctx = eval_context(cfg, policy, tokenizer, mesh=mesh)
    if cfg.critics.eval_limit:
        problems = problems[:cfg.critics.eval_limit]
    ctx.components.update(eval_components(cfg, workdir, list(cfg.critics.eval_methods), policy, tokenizer,
                                          [ctx.prompt_for(p) for p in problems], mesh=mesh, scorer=scorer))
    return evaluate_methods(problems, ctx, list(cfg.critics.eval_methods), critics_dir(workdir),
                            batch_size=cfg.eval.batch_size)
