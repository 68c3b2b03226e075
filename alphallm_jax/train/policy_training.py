"""Self-improvement training of the policy on search trees, through the shared trainer.

What the loop (and ``alphallm train-policy``) calls, each with the model, its tokenizer, the records
from ``train.pairs``, the ``cfg.policy_train`` section and a working directory:

* ``train_sft_on_traces``: AlphaLLM's round, SFT on the best trajectory per prompt (loss on solution
  tokens only), early-stopped on a held-out share of the prompts; runs in ``workdir/sft``;
* ``train_preference``: DPO on trajectory pairs with the ordering ``cfg.ordering`` (``cpl``,
  ``shuffle``, ``complete_only``, ``q_pairs``); the reference log-probabilities are computed once from
  the model as passed in and cached; each epoch's order is logged; each finished epoch's policy can
  be saved (``save_epoch_policies``); runs in ``workdir/dpo``.

Both resume: the trainer restarts from its newest checkpoint, the reference cache is reused, and a
finished epoch's saved policy is not written again. ``run_policy_training`` is the whole command:
trees -> records (JSONL artifacts) -> training -> ``workdir/policy`` (a Hugging Face checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from alphallm_jax.models.hf_io import save_hf_checkpoint
from alphallm_jax.models.tokenizer import Tokenizer
from alphallm_jax.paper_presets import SIZED_KEYS
from alphallm_jax.train.batching import SFTExample, drop_overlong_splits
from alphallm_jax.train.cpl import ORDERINGS, EpochOrder, select_pairs
from alphallm_jax.train.dpo import PreferenceExample, make_collate, make_dpo_loss, preference_length, with_reference
from alphallm_jax.train.losses import make_sft_loss
from alphallm_jax.train.pairs import (
    ExtractionConfig,
    extract_all,
    largest_sibling_gap,
    pair_counts,
    read_trees,
    tree_dirs,
    write_records,
)
from alphallm_jax.train.trainer import TrainConfig, Trainer
from alphallm_jax.utils.distributed import barrier, broadcast_int, is_coordinator
from alphallm_jax.utils.io import (
    PathLike,
    as_path,
    atomic_write_json,
    atomic_write_text,
    files_fingerprint,
    read_jsonl_tolerant_tail,
    rebase_paths,
)
from alphallm_jax.utils.run_identity import check_run_identity

log = logging.getLogger(__name__)
DONE = "DONE"
METHODS = ("sft", "dpo")


# ------------------------------------------------------------------------------------ examples
class _PromptTokens:
    """``tokenizer.encode(prompt, add_bos=True)`` (how the search tokenised it), memoised: many
    records share a prompt."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            self.cache[prompt] = self.tokenizer.encode(prompt, add_bos=True)
        return self.cache[prompt]


def _ended(token_ids: Sequence[int], eos_ids: Sequence[int], append_eos: bool) -> tuple[int, ...]:
    """A complete trajectory's tokens ending with EOS (appended when the option stopped at a stop
    string instead), so the policy learns to stop after the answer."""
    ids = tuple(int(t) for t in token_ids)
    if append_eos and (not ids or ids[-1] not in eos_ids):
        ids += (int(eos_ids[0]),)
    return ids


def trace_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                   append_eos: bool = True) -> list[SFTExample]:
    """SFT examples of trace records: (prompt with BOS, the trajectory's option tokens [+ EOS])."""
    prompt_ids = _PromptTokens(tokenizer)
    return [SFTExample(prompt_ids(r["prompt"]), _ended(r["token_ids"], tokenizer.eos_ids, append_eos))
            for r in records]


def preference_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                        append_eos: bool = True) -> list[PreferenceExample]:
    """Preference examples of pair records: prompt = header prompt (with BOS) + the shared prefix's
    option tokens; each side's option tokens [+ EOS]; grouped by problem; r_g from the record."""
    prompt_ids = _PromptTokens(tokenizer)
    eos = tokenizer.eos_ids
    return [PreferenceExample(
        pair_id=r["pair_id"], group=r["problem_id"], kind=r["kind"],
        prompt_ids=tuple(prompt_ids(r["prompt"]) + [int(t) for t in r["prefix_token_ids"]]),
        chosen_ids=_ended(r["chosen"]["token_ids"], eos, append_eos),
        rejected_ids=_ended(r["rejected"]["token_ids"], eos, append_eos),
        reward_gap=float(r["reward_gap"])) for r in records]


def split_by_prompt(records: Sequence[Mapping[str, Any]], dev_fraction: float,
                    seed: int = 0) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, dev): whole problems go to dev by a hash of (seed, problem id), so a prompt's pairs
    never straddle the split. Without a usable split (fraction 0, or one side empty) dev is empty."""
    if dev_fraction <= 0:
        return list(records), []

    def to_dev(pid: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < dev_fraction

    train = [r for r in records if not to_dev(str(r["problem_id"]))]
    dev = [r for r in records if to_dev(str(r["problem_id"]))]
    return (list(records), []) if not train or not dev else (train, dev)


# ------------------------------------------------------------------------------------ training
def _get(cfg: Any, name: str, default: Any) -> Any:
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def _epoch_snapshots(model_cfg, tokenizer: Tokenizer, run_dir, steps_per_epoch: int) -> Callable:
    """A trainer callback saving the policy at the end of every epoch to ``run_dir/epoch_K``."""
    def callback(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step % steps_per_epoch:
            return
        path = run_dir / f"epoch_{step // steps_per_epoch}"
        if broadcast_int((path / DONE).exists()):  # saving gathers the parameters: all or none
            return
        save_hf_checkpoint(trainer.current_model(), model_cfg, path, tokenizer=tokenizer)
        if is_coordinator():
            atomic_write_text(path / DONE, "ok\n")
        barrier(f"epoch-policy:{path}")

    return callback


def saved_epoch_policies(run_dir) -> list[str]:
    """The finished `run_dir/epoch_K` policies in epoch order (epoch_10 after epoch_9): the loop labels
    each policy by its place in this list."""
    found = [(int(m.group(1)), str(p.parent)) for p in as_path(run_dir).glob(f"epoch_*/{DONE}")
             if (m := re.fullmatch(r"epoch_(\d+)", p.parent.name))]
    return [path for _, path in sorted(found)]


def _epoch_means(metrics_path, steps_per_epoch: int) -> list[dict[str, float]]:
    """Per epoch, the mean of the logged train metrics (``metrics.jsonl``: every step with
    ``log_every = 1``)."""
    rows, _ = read_jsonl_tolerant_tail(metrics_path)
    by_epoch: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("split") == "train":
            by_epoch.setdefault(math.ceil(r["step"] / steps_per_epoch), []).append(r)
    out = []
    for epoch in sorted(by_epoch):
        group = by_epoch[epoch]
        keys = [k for k in group[0] if k not in ("step", "split", "time", "epoch")]
        out.append({"epoch": epoch, **{k: sum(float(r[k]) for r in group) / len(group) for k in keys}})
    return out


def train_sft_on_traces(model, tokenizer: Tokenizer, records: Sequence[Mapping[str, Any]], cfg: Any,
                        workdir: PathLike, *, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """SFT of ``model`` (in place) on trace records with ``cfg.sft`` (a TrainConfig section);
    ``cfg.sft_dev_fraction`` of the prompts are held out for early stopping. Returns a summary."""
    if not records:
        raise ValueError("no SFT traces to train on (no tree had a complete trajectory with ORM >= "
                         "orm_threshold)")
    run_dir = as_path(workdir) / "sft"
    train_cfg = TrainConfig.from_config(cfg.sft)
    train, dev = split_by_prompt(records, float(_get(cfg, "sft_dev_fraction", 0.0)), train_cfg.seed)
    append_eos = bool(_get(cfg, "append_eos", True))
    chunk = int(_get(cfg, "logits_chunk_size", 0)) or None
    trainer = Trainer(model, make_sft_loss(chunk), train_cfg, mesh=mesh, workdir=str(run_dir / "train"))
    start = time.time()
    train_ex, dev_ex = drop_overlong_splits(trace_examples(train, tokenizer, append_eos=append_eos),
                                            trace_examples(dev, tokenizer, append_eos=append_eos),
                                            train_cfg.max_seq_len, "SFT traces", "sft.max_seq_len")
    fit = trainer.fit(train_ex, dev_ex or None)
    return {"method": "sft", "train_traces": len(train_ex), "dev_traces": len(dev_ex), "steps": fit.step,
            "epochs": fit.epoch, "stopped_early": fit.stopped_early, "best_step": fit.best_step,
            "best_dev_loss": fit.best_dev_loss, "train_metrics": fit.train_metrics,
            "dev_metrics": fit.dev_metrics, "wall_seconds": time.time() - start}


def train_preference(model, tokenizer: Tokenizer, records: Sequence[Mapping[str, Any]], cfg: Any,
                     workdir: PathLike, *, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """DPO of ``model`` (in place) on pair records with ``cfg.dpo`` (a TrainConfig section), ordered
    by ``cfg.ordering`` (which also picks the pair kinds), ``cfg.beta``, ``cfg.label_smoothing``,
    ``cfg.dpo_nll_weight``, ``cfg.preference_loss`` and, for CPL, ``cfg.alpha``. ``model`` as passed in is the reference.
    Returns a summary with each epoch's mean train metrics and the saved epoch policies."""
    ordering = str(_get(cfg, "ordering", "cpl"))
    if ordering not in ORDERINGS:
        raise ValueError(f"policy_train.ordering={ordering!r}; choose from {ORDERINGS}")
    pairs = select_pairs(records, ordering)
    if not pairs:
        raise ValueError(f"no pairs for ordering {ordering!r} (pair kinds {pair_counts(records)})")
    run_dir = as_path(workdir) / "dpo"
    train_cfg = TrainConfig.from_config(cfg.dpo)
    train, dev = split_by_prompt(pairs, float(_get(cfg, "dpo_dev_fraction", 0.0)), train_cfg.seed)
    append_eos = bool(_get(cfg, "append_eos", True))
    chunk = int(_get(cfg, "logits_chunk_size", 0)) or None
    logp_batch = int(_get(cfg, "logp_batch_size", train_cfg.eval_batch_size or train_cfg.batch_size))
    collate = make_collate(max_seq_len=train_cfg.max_seq_len, pad_to_multiple=train_cfg.pad_to_multiple,
                           fixed_length=train_cfg.fixed_seq_len)
    start = time.time()
    loss_fn = make_dpo_loss(float(cfg.beta), float(_get(cfg, "label_smoothing", 0.0)), chunk,
                            nll_weight=float(_get(cfg, "dpo_nll_weight", 0.0)),
                            loss_type=str(_get(cfg, "preference_loss", "sigmoid")))
    trainer = Trainer(model, loss_fn,
                      train_cfg, mesh=mesh, workdir=str(run_dir / "train"), collate_fn=collate,
                      length_fn=preference_length)
    # The reference is the trainer's starting point, computed as its steps compute (master weights,
    # compute dtype), so the policy equals it exactly at step 0. A new Trainer holds the initial
    # parameters until `fit` restores a checkpoint, so a resumed run gets the same reference (and
    # reads it from the cache beside the pairs anyway).
    train_raw, dev_raw = drop_overlong_splits(preference_examples(train, tokenizer, append_eos=append_eos),
                                              preference_examples(dev, tokenizer, append_eos=append_eos),
                                              train_cfg.max_seq_len, "pairs", "dpo.max_seq_len")
    examples = with_reference(
        trainer.current_model(), train_raw + dev_raw,
        batch_size=logp_batch, max_seq_len=train_cfg.max_seq_len,
        pad_to_multiple=train_cfg.pad_to_multiple, mesh=trainer.mesh, rules=trainer.rules,
        cache_path=run_dir / "reference_logps.jsonl", bucket_window=train_cfg.bucket_window,
        logits_chunk_size=chunk)
    train_ex, dev_ex = examples[:len(train_raw)], examples[len(train_raw):]
    orderer = EpochOrder(train_ex, ordering, alpha=float(_get(cfg, "alpha", 0.5)), seed=train_cfg.seed,
                         log_path=run_dir / "order.jsonl", batch_size=logp_batch, collate_fn=collate,
                         logits_chunk_size=chunk)
    steps_per_epoch = math.ceil(len(train_ex) / train_cfg.batch_size)
    callbacks = []
    if bool(_get(cfg, "save_epoch_policies", False)):
        callbacks.append(_epoch_snapshots(model.cfg, tokenizer, run_dir, steps_per_epoch))
    fit = trainer.fit(train_ex, dev_ex or None, callbacks=callbacks, epoch_order_fn=orderer)
    epoch_policies = saved_epoch_policies(run_dir)
    return {"method": "dpo", "ordering": ordering, "train_pairs": len(train_ex), "dev_pairs": len(dev_ex),
            "pair_kinds": pair_counts(pairs), "steps": fit.step, "epochs": fit.epoch,
            "steps_per_epoch": steps_per_epoch, "stopped_early": fit.stopped_early,
            "train_metrics": fit.train_metrics, "dev_metrics": fit.dev_metrics,
            "epoch_metrics": _epoch_means(run_dir / "train" / "metrics.jsonl", steps_per_epoch),
            "epoch_policies": epoch_policies, "wall_seconds": time.time() - start}


# The `policy_train` keys only the other method reads: a run's identity leaves them out, so changing
# DPO's rate neither refuses nor retrains a finished SFT run (and the SFT keys likewise for DPO).
OTHER_METHOD_KEYS = {
    "sft": ("dpo", "tau", "complete_value_field", "completion", "step_reward_field", "min_visits",
            "max_pairs_per_prompt", "q_pairs_min_gap", "dpo_dev_fraction", "ordering", "alpha", "beta",
            "label_smoothing", "preference_loss", "dpo_nll_weight", "logp_batch_size", "save_epoch_policies"),
    "dpo": ("sft", "orm_threshold", "sft_selection", "min_vote_share", "sft_traces_per_prompt",
            "sft_dev_fraction"),
}


def run_policy_training(cfg, workdir: PathLike, method: str | None = None, *,
                        mesh: jax.sharding.Mesh | None = None, allow_untrained: bool = False) -> dict[str, Any]:
    """``alphallm train-policy``: the policy from ``cfg.model.checkpoint``, the trees from
    ``cfg.policy_train.trees_dir``; writes ``sft_traces.jsonl`` or ``pairs.jsonl`` (every pair kind,
    with provenance), trains, and saves ``workdir/policy`` (+ ``DONE``) and ``train_policy.json``.
    Skipped when ``workdir/policy/DONE`` exists.

    When nothing passes the thresholds (no trace; no pair of a kind ``policy_train.ordering`` uses),
    training raises, unless ``allow_untrained`` (the loop, whose weak policies and small budgets may
    leave nothing): then the policy is not loaded, the record keeps ``cfg.model.checkpoint`` as its
    policy and says why in ``untrained``, and a rerun skips it too."""
    from alphallm_jax.models.loading import load_policy

    pt = cfg.policy_train
    method = method or pt.method
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose from {METHODS}")
    root = as_path(workdir)
    if not cfg.model.checkpoint:
        raise ValueError("config key model.checkpoint is empty: set --config.model.checkpoint=DIR")
    if not pt.trees_dir:
        raise ValueError("config key policy_train.trees_dir is empty: set it to the search's tree directory")
    # A rerun resumes (or skips) only the run of this same starting policy, trees and settings; the
    # paths are not compared, so a moved run still resumes.
    roots = tree_dirs(pt.trees_dir)
    trees_fingerprint = [files_fingerprint(d) for d in roots]
    check_run_identity(root, {"method": method, "init_policy": files_fingerprint(cfg.model.checkpoint),
                              "trees": trees_fingerprint[0] if len(trees_fingerprint) == 1 else trees_fingerprint,
                              "policy_train": {k: v for k, v in pt.to_dict().items()
                                               if k != "trees_dir" and k not in OTHER_METHOD_KEYS[method]},
                              "dtype": cfg.model.dtype},
                       # what a paper preset sizes for its mesh (accumulation, remat), which a run resumed on
                       # another mesh may change: the same updates, split or recomputed otherwise
                       resumable=tuple(k for k in SIZED_KEYS if k.startswith("policy_train.")))
    record_path = root / "train_policy.json"
    if broadcast_int(record_path.exists() and ((root / "policy" / DONE).exists()
                                               or bool(json.loads(record_path.read_text()).get("untrained")))):
        done = json.loads(record_path.read_text())
        written_under = done.pop("workdir", None)
        return {**rebase_paths(done, written_under, str(root)), "skipped": True}
    trees = read_trees(roots)
    traces, pairs = extract_all(trees, ExtractionConfig.from_config(pt))
    if is_coordinator():
        write_records(root / ("sft_traces.jsonl" if method == "sft" else "pairs.jsonl"),
                      traces if method == "sft" else pairs)
    counts = {"init_checkpoint": str(cfg.model.checkpoint), "trees_dir": str(pt.trees_dir),
              "num_trees": len(trees), "sft_traces": len(traces), "pairs": pair_counts(pairs)}
    ordering = str(_get(pt, "ordering", "cpl"))
    if not (traces if method == "sft" else select_pairs(pairs, ordering)):
        why = ("no SFT traces passed the thresholds" if method == "sft" else
               f"no pairs for ordering {ordering!r} passed the thresholds")
        if not allow_untrained:
            gap = ("" if method == "sft" else f"; the largest Q gap between visited siblings there is "
                   f"{largest_sibling_gap(trees, int(_get(pt, 'min_visits', 1))):.3g}, tau {float(pt.tau):g}")
            raise ValueError(f"{why} (policy_train.orm_threshold, tau, sft_selection) in the "
                             f"{len(trees)} trees of {pt.trees_dir}: {len(traces)} SFT traces, pairs "
                             f"{pair_counts(pairs)}{gap}")
        record = {"policy": str(cfg.model.checkpoint), **counts, "method": method, "steps": 0,
                  "train_pairs": 0, "epoch_policies": [], "untrained": why}
        if method == "dpo":
            record["ordering"] = ordering
    else:
        model, tokenizer = load_policy(cfg, cfg.model.checkpoint, mesh=mesh)
        if method == "sft":
            summary = train_sft_on_traces(model, tokenizer, traces, pt, root, mesh=mesh)
        else:
            summary = train_preference(model, tokenizer, pairs, pt, root, mesh=mesh)
        save_hf_checkpoint(model, model.cfg, root / "policy", tokenizer=tokenizer)
        record = {"policy": str(root / "policy"), **counts, **summary}
    if is_coordinator():
        atomic_write_json(record_path, {**record, "workdir": str(root)})  # moved workdirs: see rebase_paths
        if not record.get("untrained"):
            atomic_write_text(root / "policy" / DONE, "ok\n")
    barrier(f"train-policy:{root}")
    return record
