"""One trainer loop for SFT now and DPO and critic training later: the loss is pluggable.

``Trainer(model, loss_fn, train_cfg, mesh=..., workdir=...).fit(train_examples, dev_examples)``

* the jitted train step (``train.step``) takes the parameters and optimizer state donated, the batch
  sharded over ("data", "fsdp") and every parameter (and its Adam moments) sharded by its logical
  axis names, and accumulates gradients over ``grad_accum_steps`` microbatches inside the step;
* every ``eval_every`` steps (or at each epoch's end) the dev loss is computed; the best
  parameters are kept in ``workdir/best`` and restored at the end; ``early_stopping_patience``
  evaluations without improvement stop the run;
* every ``checkpoint_every`` steps an orbax checkpoint (``workdir/checkpoints``, the newest
  ``keep_checkpoints`` kept, written asynchronously) holds the parameters, the optimizer state, the
  data iterator's (epoch, step), the early-stopping state and the rng: a run killed at any point and
  started again with the same config and data ends with the same parameters as an uninterrupted run;
* a non-finite loss or gradient stops the run with ``NonFiniteLossError`` naming the step; the bad
  update is never applied and no checkpoint is written after it, so the last good one is kept;
* metrics go to the console (tqdm), TensorBoard event files (``workdir/tensorboard``) and
  ``workdir/metrics.jsonl``;
* ``fit(..., epoch_order_fn=f)`` lets the caller order every epoch (curriculum learning, CPL):
  ``f(trainer, epoch)`` runs at the start of each epoch that will train (not after an early stop
  or the last step) with the current parameters (``trainer.current_model()``) and returns the
  epoch's example order, which replaces the shuffle; the order of the epoch in progress is saved in
  each checkpoint, so a resumed run continues it without calling ``f`` again.

After ``fit`` (normal end, early stop, error) the model passed in holds the trainer's parameters
(the best ones when a dev set was given and ``restore_best``). While ``fit`` runs the trainer owns
the parameter buffers (they are donated to the step).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alphallm_jax.models.sharding import ShardingRules, batch_shards, logical_to_spec, make_mesh, state_shardings
from alphallm_jax.train import step as step_lib
from alphallm_jax.train.batching import BatchIterator, IteratorState, default_collate, microbatch_problem
from alphallm_jax.train.losses import LossFn
from alphallm_jax.train.optim import make_optimizer, make_schedule, warmup_steps_for
from alphallm_jax.utils.io import append_jsonl, atomic_write_json, read_jsonl_tolerant_tail, write_jsonl_atomic

log = logging.getLogger(__name__)

# Jitted steps shared across Trainer instances (same graph, loss, mesh, optimizer settings).
_STEP_CACHE: dict[tuple, Any] = {}
_STEP_CACHE_SIZE = 16

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) of a train step was NaN or Inf; the run stopped.

    ``step`` is the 1-based number of the failing update; ``last_good_step`` the newest checkpoint
    kept (None when none was written yet).
    """

    def __init__(self, step: int, loss: float, grad_norm: float, last_good_step: int | None,
                 checkpoint_dir: str):
        self.step = step
        self.loss = loss
        self.grad_norm = grad_norm
        self.last_good_step = last_good_step
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        where = (f"last good checkpoint: step {last_good_step} in {checkpoint_dir}"
                 if last_good_step is not None else "no checkpoint was written before it")
        super().__init__(f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm}); "
                         f"the update was not applied; {where}")


# TrainConfig fields that leave the trained weights as they are (bookkeeping, or how a step is split or
# recomputed): left out of what a run records as its identity.
TRAIN_BOOKKEEPING_KEYS = ("checkpoint_every", "keep_checkpoints", "async_checkpointing", "log_every", "progress_bar",
                          "compiler_options", "grad_accum_steps", "remat", "eval_batch_size")


@dataclasses.dataclass
class TrainConfig:
    """Everything the trainer loop reads. Paper SFT preset: lr 5e-6 -> 1e-6, 10% warm-up,
    batch 128, at most 3 epochs, early stopping on a dev split."""

    learning_rate: float = 5e-6
    end_learning_rate: float = 1e-6
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0: no clipping
    batch_size: int = 128  # global batch (all devices, all microbatches)
    grad_accum_steps: int = 1
    epochs: int = 3
    max_steps: int | None = None  # caps epochs * steps_per_epoch
    max_seq_len: int | None = 1024
    pad_to_multiple: int = 64
    fixed_seq_len: bool = False  # pad every batch to max_seq_len (one compiled shape)
    bucket_window: int = 32  # length bucketing window, in batches (1: no bucketing)
    eval_every: int = 0  # steps between dev evaluations; 0: at the end of every epoch
    eval_batch_size: int | None = None  # default: batch_size
    early_stopping_patience: int | None = 3  # evaluations without improvement; None/0: never stop
    early_stopping_min_delta: float = 0.0
    restore_best: bool = True  # end with the best dev parameters
    checkpoint_every: int = 500  # steps; 0: only at the end; < 0: never (throwaway runs, benchmarks)
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    log_every: int = 10
    seed: int = 0
    compute_dtype: str | None = None  # e.g. "bfloat16": the model computes in it (cfg.dtype)
    master_dtype: str | None = "float32"  # parameters and optimizer state dtype; None: keep
    # Per-layer rematerialisation (`ModelConfig.remat`): activations of one layer at a time in the
    # backward pass, for each layer's forward run twice (the 30M benchmark model's forward and backward
    # over 8 x 256 tokens on 2 CPU cores: 1.25 -> 1.34 s, XLA's working memory 1,088 -> 335 MiB); what
    # lets a large model's step fit (`alphallm plan`).
    remat: bool = False
    progress_bar: bool = True
    # XLA options for the train and eval steps, e.g. {"xla_backend_optimization_level": 0} for
    # fast compiles in tests; TPU/GPU scheduling flags in production.
    compiler_options: dict[str, Any] | None = None
    # A trainer workdir (or its `checkpoints` folder) whose newest checkpoint's optimizer state (Adam's
    # moments and count) starts this run instead of a fresh one: a round that continues a model's
    # training then takes steps scaled by that training's gradient statistics, not a fresh Adam's
    # first steps of about the learning rate on every parameter. The parameters are not read from it.
    optimizer_from: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("batch_size and grad_accum_steps must be >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum_steps "
                             f"{self.grad_accum_steps}")
        for name in ("compute_dtype", "master_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name}={value!r}; choose from {sorted(DTYPES)} or None")
        if self.epochs < 1 and not self.max_steps:
            raise ValueError("need epochs >= 1 or max_steps")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> TrainConfig:
        """From a dict or an ml-collections ``ConfigDict`` (unknown keys are an error)."""
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass
class FitResult:
    step: int  # optimizer steps done
    total_steps: int
    epoch: float  # epochs done (fractional)
    stopped_early: bool
    best_step: int | None
    best_dev_loss: float | None
    train_metrics: dict[str, float]  # the last train step's
    dev_metrics: dict[str, float] | None  # the last evaluation's


@dataclasses.dataclass
class _EarlyStop:
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    """A restore target for `x`: its shape, dtype and placement."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _path_parts(path) -> tuple[str, ...]:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()  # an nnx.Variable's value: drop the level
    return tuple(parts)


def tree_to_nested(tree: Any) -> dict:
    """A pytree as nested dicts of arrays keyed by its path names (what orbax writes)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = _path_parts(path) or ("_",)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts[-1] in node:
            raise ValueError(f"two leaves map to the checkpoint key {'/'.join(parts)}")
        node[parts[-1]] = leaf
    return out


def nested_to_tree(nested: dict, like: Any) -> Any:
    """Inverse of ``tree_to_nested``: the leaves of ``nested`` in the structure of ``like``."""
    leaves = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    for path, _ in paths:
        node = nested
        for p in _path_parts(path) or ("_",):
            node = node[p]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _set_model_config(model: nnx.Module, **fields: Any) -> list[tuple[nnx.Module, Any]]:
    """Sets `fields` (e.g. dtype, remat) on the config of every submodule whose config has them;
    returns what to restore."""
    changed = []
    for _, module in nnx.iter_graph(model):
        cfg = getattr(module, "cfg", None) if isinstance(module, nnx.Module) else None
        if cfg is not None and hasattr(cfg, "replace") and all(hasattr(cfg, k) for k in fields):
            if any(getattr(cfg, k) != v for k, v in fields.items()):
                changed.append((module, cfg))
                module.cfg = cfg.replace(**fields)
    return changed


def default_train_mesh() -> jax.sharding.Mesh:
    """The Trainer's mesh when given none. One process: its first device. Several processes (a multi-host
    run): every device of every process, data parallel, so parameters and optimizer state are global
    arrays that all processes step and checkpoint together (orbax cannot save host-local arrays there)."""
    if jax.process_count() == 1:
        return make_mesh(1, 1, 1, devices=[jax.local_devices()[0]])
    return make_mesh(jax.device_count(), 1, 1)


def train_batch_shards(mesh: jax.sharding.Mesh | None) -> int:
    """How many ways a train step on `mesh` (None: `default_train_mesh`) splits its batch."""
    return batch_shards(mesh if mesh is not None else default_train_mesh())


class Trainer:
    """See the module doc. ``loss_fn(model, batch) -> (loss, metrics)`` (``train.losses``)."""

    def __init__(self, model: nnx.Module, loss_fn: LossFn, train_cfg: TrainConfig, *,
                 mesh: jax.sharding.Mesh | None = None, workdir: str | os.PathLike,
                 rules: ShardingRules | None = None, eval_loss_fn: LossFn | None = None,
                 collate_fn: Callable[[Sequence[Any], int], dict] | None = None,
                 length_fn: Callable[[Any], int] | None = None):
        self.model = model
        self.loss_fn = loss_fn
        self.eval_loss_fn = eval_loss_fn or loss_fn
        self.cfg = train_cfg
        self.rules = rules = rules if rules is not None else ShardingRules()
        if "://" in os.fspath(workdir):  # abspath would make gs://b/x a local ./gs:/b/x
            raise ValueError(f"trainer workdir {os.fspath(workdir)}: orbax checkpoints go through the filesystem "
                             f"here; mount the bucket (gcsfuse) and pass the mounted path")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.collate_fn = collate_fn
        self.length_fn = length_fn
        self.mesh = mesh if mesh is not None else default_train_mesh()
        self.is_main = jax.process_index() == 0
        dp = train_batch_shards(self.mesh)
        problem = microbatch_problem(train_cfg.batch_size, train_cfg.grad_accum_steps, dp)
        if problem:
            raise ValueError(problem)
        self.dp_size = dp

        # The graph the step runs: with compute_dtype (remat), a copy of the model's graph computing in it
        # (recomputing each layer's intermediates in the backward pass); the model itself is unchanged.
        changes = {**({"dtype": train_cfg.compute_dtype} if train_cfg.compute_dtype else {}),
                   **({"remat": True} if train_cfg.remat else {})}
        changed = _set_model_config(model, **changes) if changes else []
        try:
            self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        finally:
            for module, cfg in changed:
                module.cfg = cfg
        self._orig_dtypes = jax.tree.map(lambda x: x.dtype, params)
        # Where the model's arrays live (one process: often its single device, unsharded), so that
        # the model comes back placed as it was, and runs the programs already compiled for it (or
        # for the same model loaded from disk), not copies compiled for the trainer's mesh.
        self._orig_shardings = (jax.tree.map(lambda x: x.sharding, params)
                                if jax.process_count() == 1 and all(
                                    isinstance(x, jax.Array) for x in jax.tree.leaves(params)) else None)
        self.param_shardings = state_shardings(params, self.mesh, rules)
        self.rest_shardings = state_shardings(self.rest, self.mesh, rules)
        master = DTYPES[train_cfg.master_dtype] if train_cfg.master_dtype else None

        def to_master(x):
            if master is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != master:
                return x.astype(master)
            return x

        with jax.set_mesh(self.mesh):
            needs_cast = master is not None and any(
                jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != master
                for x in jax.tree.leaves(params))
            if needs_cast:
                self.params = jax.jit(lambda p: jax.tree.map(to_master, p),
                                      out_shardings=self.param_shardings)(params)
            else:  # already master dtype: a no-op when already placed, else a reshard
                self.params = jax.device_put(params, self.param_shardings)
            self.rest = jax.device_put(self.rest, self.rest_shardings)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.opt_state = None
        key = np.asarray(jax.random.key_data(jax.random.PRNGKey(train_cfg.seed)))
        self.rng = jax.make_array_from_callback(key.shape, self.replicated, lambda idx: key[idx])  # a global array
        self.step = 0
        self._eval_fn = None
        self._writer = None

    # ---------------------------------------------------------------- shardings and data
    def _batch_sharding(self, ndim: int) -> NamedSharding:
        spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules)
        return NamedSharding(self.mesh, spec)

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Every process holds the same global host batch; each device gets its rows."""
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            sharding = self._batch_sharding(v.ndim)
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    def _opt_shardings(self, abstract_opt: Any) -> Any:
        """Adam moments take their parameter's sharding (matched by path suffix); the rest is
        replicated."""
        by_path = {}
        for path, sh in jax.tree_util.tree_flatten_with_path(self.param_shardings)[0]:
            by_path[_path_parts(path)] = sh
        shapes = {_path_parts(p): x.shape
                  for p, x in jax.tree_util.tree_flatten_with_path(self.params)[0]}

        def pick(path, leaf):
            parts = _path_parts(path)
            for i in range(len(parts)):
                suffix = parts[i:]
                if suffix in by_path and shapes[suffix] == leaf.shape:
                    return by_path[suffix]
            return self.replicated

        return jax.tree_util.tree_map_with_path(pick, abstract_opt)

    def _make_iterator(self, examples: Sequence[Any], *, batch_size: int, shuffle: bool) -> BatchIterator:
        cfg = self.cfg
        if not examples:
            raise ValueError("no examples to batch: the trainer needs at least one train example (and an "
                             "evaluation at least one dev example)")
        collate, length = self.collate_fn, self.length_fn
        if collate is None:
            collate, default_length = default_collate(
                examples[0], max_seq_len=cfg.max_seq_len, pad_to_multiple=cfg.pad_to_multiple,
                fixed_length=cfg.fixed_seq_len)
            length = length or default_length
        return BatchIterator(examples, batch_size=batch_size, collate_fn=collate, length_fn=length,
                             seed=cfg.seed, shuffle=shuffle, bucket_window=cfg.bucket_window)

    # ---------------------------------------------------------------- metrics
    def _log_metrics(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, "time": time.time(),
               **{k: float(v) for k, v in metrics.items()}}
        append_jsonl(os.path.join(self.workdir, "metrics.jsonl"), row)
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(f"{split}/{k}", float(v), step)

    def _truncate_metrics(self, step: int) -> None:
        """On resume: drop metric rows a killed run wrote after its last checkpoint."""
        path = os.path.join(self.workdir, "metrics.jsonl")
        if not self.is_main or not os.path.exists(path):
            return
        rows, torn = read_jsonl_tolerant_tail(path)
        kept = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(kept) != len(rows) or torn is not None:
            write_jsonl_atomic(path, kept)

    # ---------------------------------------------------------------- checkpoints
    def _managers(self, *, with_dev: bool):
        """(checkpoint manager, best-parameters manager); a no-op stand-in for each one the run
        does not use (no checkpoints when ``checkpoint_every < 0``, no best without a dev set)."""
        cfg = self.cfg

        def manager(name, max_to_keep):
            # Distinct barrier keys per manager: in a multi-process run the two managers' async
            # commits would otherwise wait on the same-named barrier.
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=cfg.async_checkpointing,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
            return ocp.CheckpointManager(os.path.join(self.workdir, name), options=opts)

        ckpt = manager("checkpoints", max(1, cfg.keep_checkpoints)) if cfg.checkpoint_every >= 0 \
            else _NoCheckpoints()
        # Best parameters: pruned by the trainer (`_prune_best`), not by count, so the best step
        # that any resumable checkpoint refers to always exists.
        best = manager("best", None) if with_dev else _NoCheckpoints()
        return ckpt, best

    def _state_tree(self) -> dict:
        return {"params": tree_to_nested(self.params), "opt_state": tree_to_nested(self.opt_state),
                "rng": self.rng}

    def _save(self, manager, best_manager, it: BatchIterator, early: _EarlyStop) -> None:
        order = it.epoch_order(it.state.epoch)
        meta = {"step": self.step, "data": it.state.to_dict(), "data_fingerprint": it.fingerprint(),
                "early_stopping": dataclasses.asdict(early), "train_config": self.cfg.to_dict(),
                "epoch_order": None if order is None else order.tolist()}
        # This checkpoint names `early.best_step`: that best checkpoint (saved asynchronously, perhaps at
        # this very step) must be final first, or a kill between the two leaves a resume whose best
        # parameters are missing for good.
        best_manager.wait_until_finished()
        manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._state_tree()), meta=ocp.args.JsonSave(meta)),
            force=True)
        # `save` returns once the previous checkpoint is final: from then on no resume can need a
        # best checkpoint older than the one that previous checkpoint refers to.
        self._prune_best(best_manager, below=self._saved_best_step)
        self._saved_best_step = early.best_step

    def _prune_best(self, best_manager, *, below: int | None = None,
                    above: int | None = None) -> None:
        for s in best_manager.all_steps():
            if (below is not None and s < below) or (above is not None and s > above):
                best_manager.delete(s)

    def _restore(self, manager, step: int) -> dict:
        target = jax.tree.map(_abstract, self._state_tree())
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        self.params = nested_to_tree(state["params"], self.params)
        self.opt_state = nested_to_tree(state["opt_state"], self.opt_state)
        self.rng = state["rng"]
        return restored["meta"]

    def _load_optimizer_state(self, path: str) -> Any:
        """The optimizer state of the newest checkpoint under `path` (see `TrainConfig.optimizer_from`),
        placed as this trainer's; the model must be the one that checkpoint trained. Only the optimizer
        state is read (orbax's partial restore), not the parameters saved beside it."""
        folder = os.path.abspath(os.fspath(path))
        if os.path.basename(folder) != "checkpoints":
            folder = os.path.join(folder, "checkpoints")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"optimizer_from={path!r}: no checkpoints folder at {folder}")
        target = {"opt_state": jax.tree.map(_abstract, tree_to_nested(self.opt_state))}
        manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True),
                                        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                       "meta": ocp.JsonCheckpointHandler()})
        try:
            latest = manager.latest_step()
            if latest is None:
                raise FileNotFoundError(f"optimizer_from={path!r}: {folder} holds no checkpoint")
            mismatch = f"optimizer_from={path!r}: the checkpoint at step {latest} of {folder} was not written " \
                       f"for this model and optimizer"
            # Every leaf checked against the saved metadata before reading: a partial restore neither fails
            # on a missing key (the target's leaf would come back unread) nor on another shape (the saved
            # one would come back), and a restore that fails midway leaves orbax's reads dangling.
            saved = getattr(manager.item_metadata(latest)["state"], "tree", None)
            if not isinstance(saved, dict):
                raise ValueError(f"optimizer_from={path!r}: the checkpoint at step {latest} of {folder} has no "
                                 f"readable state metadata")
            for key_path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
                got = saved
                for k in key_path:
                    got = got.get(k.key) if isinstance(got, dict) else None
                shape, dtype = getattr(got, "shape", None), getattr(got, "dtype", None)
                if shape is None or (tuple(shape), np.dtype(dtype)) != (want.shape, np.dtype(want.dtype)):
                    found = "nothing" if shape is None else f"{np.dtype(dtype)}{list(shape)}"
                    raise ValueError(f"{mismatch}: {'/'.join(_path_parts(key_path))} is "
                                     f"{np.dtype(want.dtype)}{list(want.shape)} here, {found} there")
            try:
                restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)))["state"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{mismatch} ({e})") from e
        finally:
            manager.close()
        log.info("optimizer state from %s (step %d)", folder, latest)
        return nested_to_tree(restored["opt_state"], self.opt_state)

    def _save_best(self, manager, dev_loss: float) -> None:
        manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": tree_to_nested(self.params)}),
            meta=ocp.args.JsonSave({"step": self.step, "dev_loss": dev_loss})), force=True)

    def _restore_best(self, manager, step: int) -> None:
        target = {"params": jax.tree.map(_abstract, tree_to_nested(self.params))}
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        self.params = nested_to_tree(restored["state"]["params"], self.params)

    # ---------------------------------------------------------------- model
    def current_model(self) -> nnx.Module:
        """A model view of the trainer's current parameters (master dtype, the step's compute
        dtype), for hooks between steps (``epoch_order_fn``, callbacks). Valid until the next train
        step, which donates the parameter buffers; never train it directly."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def _write_back(self) -> None:
        """Puts the trainer's parameters into the model (in the model's original dtypes and
        placement)."""
        params = jax.tree.map(lambda x, dt: x if x.dtype == dt else x.astype(dt),
                              self.params, self._orig_dtypes)
        if self._orig_shardings is not None:
            params = jax.device_put(params, self._orig_shardings)
        nnx.update(self.model, params)

    # ---------------------------------------------------------------- compiled steps
    def _compiled(self):
        """(tx, opt_state shardings, jitted opt init, jitted train step), shared by every Trainer
        with the same model graph, loss, mesh and optimizer settings (no recompiles across runs). The
        learning-rate schedule and the weight decay are not among them: the step takes both as inputs."""
        cfg = self.cfg
        options = tuple(sorted((cfg.compiler_options or {}).items()))
        key = (self.graphdef, self.loss_fn, self.mesh, self.rules, cfg.max_grad_norm,
               cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.grad_accum_steps, options,
               jax.tree.structure(self.params), jax.tree.structure(self.rest))
        hit = _STEP_CACHE.get(key)
        if hit is not None:
            return hit
        # Unit learning rate and no decay: the step adds the decay and scales the updates by the
        # schedule's value, both inputs (train.step).
        tx = make_optimizer(learning_rate=1.0, weight_decay=0.0,
                            max_grad_norm=cfg.max_grad_norm, b1=cfg.adam_b1, b2=cfg.adam_b2,
                            eps=cfg.adam_eps)
        opt_shardings = self._opt_shardings(jax.eval_shape(tx.init, self.params))
        init_fn = jax.jit(tx.init, out_shardings=opt_shardings)
        train_step = jax.jit(
            step_lib.make_train_step(self.graphdef, self.loss_fn, tx, cfg.grad_accum_steps),
            in_shardings=(self.param_shardings, opt_shardings, self.rest_shardings, None,
                          self.replicated, self.replicated, self.replicated),
            out_shardings=(self.param_shardings, opt_shardings, self.replicated),
            donate_argnums=(0, 1), compiler_options=cfg.compiler_options)
        value = (tx, opt_shardings, init_fn, train_step)
        if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = value
        return value

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        """``eval_loss_fn``'s metrics over ``examples`` (current parameters): the weighted mean of the
        batches' metrics, or, for a loss with ``batch_totals`` (one weight per batch cannot stand for
        its means over differently many positions), the whole set's exactly: the totals are counted
        over every batch first and each batch's loss is its share of the set's."""
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        bs = -(-bs // self.dp_size) * self.dp_size
        it = self._make_iterator(examples, batch_size=bs, shuffle=False)
        totals_fn = step_lib.batch_totals_fn(self.eval_loss_fn)
        # Collated once: a loss with totals reads every batch before the first is evaluated.
        batches = it.iterate_epoch(0) if totals_fn is None else list(it.iterate_epoch(0))
        totals = None if totals_fn is None else self._set_totals(batches, totals_fn)
        if self._eval_fn is None:
            key = ("eval", self.graphdef, self.eval_loss_fn, self.mesh, self.rules,
                   tuple(sorted((self.cfg.compiler_options or {}).items())))
            if key not in _STEP_CACHE:
                eval_step = step_lib.make_eval_step(self.graphdef, self.eval_loss_fn)
                _STEP_CACHE[key] = jax.jit(eval_step, out_shardings=self.replicated,
                                           compiler_options=self.cfg.compiler_options)
            self._eval_fn = _STEP_CACHE[key]
        rows = []
        with jax.set_mesh(self.mesh):
            for batch in batches:
                batch = self._device_batch(batch)
                if totals is not None:
                    batch[step_lib.TOTALS_KEY] = totals
                rows.append(self._eval_fn(self.params, self.rest, batch))
            rows = jax.device_get(rows)
        rows = [{k: float(v) for k, v in r.items()} for r in rows]
        return step_lib.combine_metrics(rows) if totals is None else step_lib.sum_metrics(rows)

    def _set_totals(self, batches: Sequence[dict[str, np.ndarray]], totals_fn: Callable) -> dict[str, jax.Array]:
        """`totals_fn` (the loss's ``batch_totals``) summed over host `batches` (every process holds
        the same ones, so every process counts the same), replicated."""
        sums: dict[str, float] = {}
        for batch in batches:
            for k, v in jax.device_get(totals_fn(batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: jax.make_array_from_callback((), self.replicated, lambda _, v=v: np.float32(v))
                for k, v in sums.items()}

    # ---------------------------------------------------------------- training
    def fit(self, train_examples: Sequence[Any], dev_examples: Sequence[Any] | None = None, *,
            callbacks: Sequence[Callable[[Trainer, int, dict[str, float]], None]] = (),
            epoch_order_fn: Callable[[Trainer, int], Sequence[int]] | None = None) -> FitResult:
        """Trains (resuming from ``workdir/checkpoints`` when one exists); see the module doc.

        ``callbacks`` are called as ``cb(trainer, step, train_metrics)`` after every step.
        ``epoch_order_fn(trainer, epoch)``, when given, returns each epoch's example order (a
        permutation of ``range(len(train_examples))``) at the start of that epoch; batches are then
        consecutive slices of it (no shuffle, no length bucketing).
        """
        try:
            with jax.set_mesh(self.mesh):
                return self._fit(list(train_examples), None if dev_examples is None else list(dev_examples),
                                 callbacks, epoch_order_fn)
        finally:
            self._write_back()

    def _fit(self, train_examples, dev_examples, callbacks, epoch_order_fn=None) -> FitResult:
        cfg = self.cfg
        os.makedirs(self.workdir, exist_ok=True)
        it = self._make_iterator(train_examples, batch_size=cfg.batch_size, shuffle=True)

        def needs_order():
            """Whether the batch at the iterator's state starts an epoch still to be ordered."""
            return epoch_order_fn is not None and it.epoch_order(it.state.epoch) is None

        def next_batch():
            """The batch at the iterator's state; an ordered epoch gets its order on first use."""
            if needs_order():
                it.set_epoch_order(it.state.epoch, epoch_order_fn(self, it.state.epoch))
            return it.peek()

        total = it.steps_per_epoch * cfg.epochs if cfg.epochs >= 1 else cfg.max_steps
        if cfg.max_steps:
            total = min(total, cfg.max_steps) if cfg.epochs >= 1 else cfg.max_steps
        warm = warmup_steps_for(total, cfg.warmup_ratio, cfg.warmup_steps)
        schedule = make_schedule(cfg.learning_rate, total, end_lr=cfg.end_learning_rate,
                                 warmup_steps=warm, kind=cfg.schedule)
        tx, opt_shardings, init_fn, train_step = self._compiled()
        self.opt_state = init_fn(self.params)
        weight_decay = np.float32(cfg.weight_decay)

        ckpt, best = self._managers(with_dev=bool(dev_examples))
        early, resumed = self._start_or_resume(ckpt, best, it, epoch_order_fn, total=total, warm=warm)

        base_key = jax.random.wrap_key_data(self.rng)
        train_metrics: dict[str, float] = {}
        dev_metrics: dict[str, float] | None = None
        last_eval_step = self.step if resumed else -1
        bar = None
        if cfg.progress_bar and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        try:
            pending = next_batch() if self.step < total and not early.stopped else None
            while pending is not None:
                host_batch = pending
                batch = self._device_batch(host_batch)
                step_key = jax.random.key_data(jax.random.fold_in(base_key, self.step))
                self.params, self.opt_state, metrics = train_step(
                    self.params, self.opt_state, self.rest, batch, schedule(self.step), weight_decay, step_key)
                it.advance()  # it.state: the next batch to train on (what checkpoints record)
                more = self.step + 1 < total
                # Prepare the next batch on the host while the device computes this step; but a new
                # epoch's order (epoch_order_fn, logged) waits until the run is known to train on it
                # (no early stop below), computed from the same parameters.
                pending = next_batch() if more and not needs_order() else None
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not metrics.pop("finite"):
                    ckpt.wait_until_finished()
                    best.wait_until_finished()
                    raise NonFiniteLossError(self.step + 1, metrics["loss"], metrics["grad_norm"],
                                             ckpt.latest_step(), str(ckpt.directory))
                self.step += 1
                window_tokens += _count_tokens(host_batch)
                train_metrics = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    lr=f"{metrics.get('learning_rate', 0.0):.2e}")
                if self.step % max(1, cfg.log_every) == 0 or self.step == total:
                    now = time.perf_counter()
                    rate = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    self._log_metrics(self.step, "train", {**metrics, "tokens_per_s": rate,
                                                           "epoch": self.step / it.steps_per_epoch})
                    self._console(f"step {self.step}/{total} " + _fmt(metrics))
                for cb in callbacks:
                    cb(self, self.step, metrics)

                epoch_end = self.step % it.steps_per_epoch == 0
                due = (self.step % cfg.eval_every == 0) if cfg.eval_every else epoch_end
                if dev_examples and (due or self.step == total) and last_eval_step != self.step:
                    dev_metrics = self.evaluate(dev_examples)
                    last_eval_step = self.step
                    self._log_metrics(self.step, "dev", dev_metrics)
                    self._update_early_stop(early, dev_metrics["loss"], best)
                    self._console(f"dev @ step {self.step}: " + _fmt(dev_metrics)
                                  + f" (best {early.best_loss:.4f} @ {early.best_step})")
                    if early.stopped:
                        self._console(f"early stopping at step {self.step}: no dev improvement in "
                                      f"{early.bad_evals} evaluations")
                        more, pending = False, None
                if more and pending is None:
                    pending = next_batch()  # orders the new epoch before a checkpoint records it
                save_due = cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0
                if cfg.checkpoint_every >= 0 and (save_due or not more):
                    self._save(ckpt, best, it, early)
            ckpt.wait_until_finished()
            best.wait_until_finished()
            if cfg.checkpoint_every >= 0:
                self._prune_best(best, below=self._saved_best_step)
            if dev_examples and cfg.restore_best and early.best_step is not None \
                    and early.best_step != self.step:
                self._restore_best(best, early.best_step)
                self._console(f"restored the best parameters (step {early.best_step}, "
                              f"dev loss {early.best_loss:.4f})")
        finally:
            ckpt.wait_until_finished()
            best.wait_until_finished()
            ckpt.close()
            best.close()
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return FitResult(step=self.step, total_steps=total, epoch=self.step / it.steps_per_epoch,
                         stopped_early=early.stopped, best_step=early.best_step,
                         best_dev_loss=early.best_loss, train_metrics=train_metrics,
                         dev_metrics=dev_metrics)

    def _start_or_resume(self, ckpt, best, it: BatchIterator, epoch_order_fn, *, total: int,
                         warm: int) -> tuple[_EarlyStop, bool]:
        """Restores the newest checkpoint (parameters, optimizer state, data position, epoch order,
        early stopping) or prepares a fresh start, and opens the TensorBoard writer: (early-stopping
        state, whether the run resumed)."""
        cfg = self.cfg
        try:
            early = _EarlyStop()
            self.step = 0
            self._saved_best_step = None
            latest = ckpt.latest_step()
            if latest is not None:
                meta = self._restore(ckpt, latest)
                self.step = int(meta["step"])
                it.state = IteratorState.from_dict(meta["data"])
                if epoch_order_fn is not None and meta.get("epoch_order") is not None:
                    it.set_epoch_order(it.state.epoch, meta["epoch_order"])
                early = _EarlyStop(**meta["early_stopping"])
                self._saved_best_step = early.best_step
                if meta.get("data_fingerprint") != it.fingerprint():
                    log.warning("resuming on different data or batching: checkpoint %s, now %s",
                                meta.get("data_fingerprint"), it.fingerprint())
                self._truncate_metrics(self.step)
                log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt.directory, self.step,
                         it.state.epoch, it.state.step)
            else:
                self._truncate_metrics(0)  # a run killed before its first checkpoint: written again
                if cfg.optimizer_from:  # a first start only: a resumed run has its own optimizer state
                    self.opt_state = self._load_optimizer_state(cfg.optimizer_from)
                if self.is_main:
                    atomic_write_json(os.path.join(self.workdir, "train_config.json"),
                                      {**cfg.to_dict(), "total_steps": total, "warmup_steps": warm,
                                       "steps_per_epoch": it.steps_per_epoch})
            # Forget the best parameters a killed run saved after the step this run starts from (all of
            # them on a fresh start, over a run killed before its first checkpoint or one that keeps
            # none): this run writes them again at the same steps, and orbax refuses a step that exists.
            best.wait_until_finished()
            self._prune_best(best, above=self.step if latest is not None else -1)
            if self.is_main:
                import tensorboardX
                self._writer = tensorboardX.SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        except BaseException:
            # A failed resume or start (a checkpoint of another model, an unreadable one) must not leave
            # the managers' background threads running past the error.
            ckpt.close()
            best.close()
            raise
        return early, latest is not None

    def _update_early_stop(self, early: _EarlyStop, loss: float, best_manager) -> None:
        cfg = self.cfg
        if early.best_loss is None or loss < early.best_loss - cfg.early_stopping_min_delta:
            early.best_loss, early.best_step, early.bad_evals = loss, self.step, 0
            self._save_best(best_manager, loss)
            if cfg.checkpoint_every < 0:  # no checkpoint to resume from can refer to older ones
                self._prune_best(best_manager, below=self.step)
        else:
            early.bad_evals += 1
            if cfg.early_stopping_patience and early.bad_evals >= cfg.early_stopping_patience:
                early.stopped = True

    def _console(self, text: str) -> None:
        if not self.is_main:
            return
        if self.cfg.progress_bar:
            from tqdm.auto import tqdm
            tqdm.write(text)
        else:
            log.info(text)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class _NoCheckpoints:
    """Stands in for a CheckpointManager a run does not use."""

    directory = None

    def latest_step(self):
        return None

    def all_steps(self):
        return []

    def save(self, *args, **kwargs):
        return False

    def delete(self, step):
        pass

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def _count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real (non-padding) tokens of a host batch, for throughput."""
    positions = [v for k, v in batch.items() if k == "positions" or k.endswith("_positions")]
    if positions:  # SFT's "positions"; paired batches' "chosen_positions" and "rejected_positions"
        return int(sum(np.sum(p >= 0) for p in positions))
    if "input_ids" in batch:
        return int(np.size(batch["input_ids"]))
    return int(np.sum(batch["row_mask"]))
