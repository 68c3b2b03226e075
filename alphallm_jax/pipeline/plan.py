"""`alphallm plan`: every model of a config sized on its mesh, abstractly (no parameter is allocated).

Per model (policy, critic, fast-rollout policy) the parameter count and per-device bytes of:

* params: each parameter's shard on the configured mesh, from its logical axis names and
  `ShardingRules` (the same rules the real run places parameters with), on a `jax.sharding.AbstractMesh`,
  so a 64-chip mesh is planned on a laptop;
* optimizer: AdamW's two moments in the master dtype, plus a master copy when the parameters are stored
  in another dtype (the trainer's `master_dtype`, float32 by default); 0 for a model that is not trained;
* gradients: one gradient tree in the master dtype during a train step;
* kv_pool: the search sampler's cached states plus two batches of working cache (`WORKING_BATCHES`),
  `rows x max_len x layers x kv_heads x head_dim x 2 (K and V)` in the compute dtype, rows split over
  (data, fsdp) and kv heads over tensor like the real cache (the critic data's sampler, which keeps
  states too, has a stage of its own: `critics.data.pool_slots` slots plus two `sampling.max_batch`
  batches, at the search's length);
* activations: an estimate of what a train step keeps for the backward pass, per device: every layer's
  intermediates, or each layer's input alone when the section sets `remat` (per-layer
  rematerialisation, plus the stacked copies of the parameters and their gradient that its scan over
  the layers builds); see `train_activation_bytes`. The estimate with rematerialisation is reported
  next to it either way (`full_remat_bytes`). Models that are not trained
  get the transient working set of one prefill layer instead (reported for every model as
  `activations_detail.inference_bytes`).

A model `fits` when its peak is at most 90% of the device memory (`mesh.hbm_gib`, else this machine's
device memory): XLA's scratch space, fragmentation and the runtime take the rest. The peak is the larger
of its two resident sets, which never overlap: serving the search (params, KV pool, one prefill layer)
and training (params, optimizer, gradients, activations). The `stages` section adds up what is resident
at once in each stage of the loop (the search holds every model's parameters and caches together).
A model whose training batch cannot split over the mesh (`train.batching.microbatch_problem`, the
trainer's own check: a microbatch of batch_size / grad_accum_steps examples must divide over
data x fsdp) does not fit whatever its bytes, and `problems` says why and which grad_accum_steps would.
`train_steps` gives every train stage's sequences per device, accumulation steps, length and `remat`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import numpy as np

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.sharding import (
    MESH_AXES,
    ShardingRules,
    batch_shards,
    logical_names,
    logical_to_spec,
    resolve_mesh_shape,
)
from alphallm_jax.train.batching import microbatch_problem

GIB = 1024 ** 3
FIT_FRACTION = 0.9
POOL_FILL_FRACTION = 0.8  # the share of device memory `fill_kv_pools` fills a state-keeping stage to
# A sampler's batch holds two caches of its rows at once beside its pool: forking copies the prefilled
# unique rows into the batch's rows (both live), and storing kept states gathers the batch's rows
# into a copy that is scattered into the donated pool (XLA's memory analysis of `engine.fork_rows` and
# `kv_pool._store_rows`; tests/test_presets_plan.py checks it). A compaction's sub-batch is at most half.
WORKING_BATCHES = 2
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """One training stage of a model: its micro-batch per device and sequence length."""

    stage: str
    sequences_per_device: int
    seq_len: int
    master_dtype: str | None
    compute_dtype: str
    logits_chunk: int = 0  # >0: the vocabulary projection runs in chunks of this many positions
    problem: str | None = None  # why the trainer would refuse this stage's batch on the mesh
    remat: bool = False  # the section's `remat`: per-layer rematerialisation
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cfg: ModelConfig
    source: str  # where the shape came from: a preset name, a checkpoint path or config sizes
    critic_head_hidden: int | None = None  # a critic (decoder backbone plus three heads)
    train: tuple[TrainShape, ...] = ()
    kv_rows: tuple[int, ...] = ()  # the sampler's caches: the pool's slots, its batches' working rows
    kv_len: int = 0
    infer_rows: int = 0  # rows of one prefill batch per device
    infer_len: int = 0


# ------------------------------------------------------------------------------------ the mesh


def abstract_mesh(cfg):
    """The configured ("data", "fsdp", "tensor") mesh as an AbstractMesh (no devices needed); one axis
    may be -1, taking what this machine's devices leave."""
    import jax
    from jax.sharding import AbstractMesh, AxisType

    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # This machine's devices only for a -1 axis: counting them starts JAX's backend, which a preset's
    # config (sized here when it loads) must not do before a multi-process run initialises.
    sizes = resolve_mesh_shape(sizes, jax.device_count() if -1 in sizes else 1)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def device_memory_bytes(cfg) -> tuple[int | None, str]:
    """(bytes per device, where the figure came from): `mesh.hbm_gib`, else this machine's first device
    (its allocator limit; for CPU devices, host memory shared by the local devices)."""
    import jax

    if cfg.mesh.hbm_gib:
        return int(cfg.mesh.hbm_gib * GIB), "mesh.hbm_gib"
    device = jax.local_devices()[0]
    if limit := allocator_limit(device):
        return limit, f"{device.device_kind} memory_stats"
    if device.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // jax.local_device_count(), "host memory / local CPU devices"
    return None, "unknown"


# ------------------------------------------------------------------------------ model shapes


def _model_config_at(path: str) -> ModelConfig | None:
    """The shape saved in a checkpoint directory (orbax model_config.json or HF config.json), if any."""
    import json
    from pathlib import Path

    from alphallm_jax.models.hf_io import read_hf_config
    from alphallm_jax.utils.checkpoint import MODEL_CONFIG_FILE

    p = Path(path) if path else None
    if p is None or not p.is_dir():
        return None
    if (p / MODEL_CONFIG_FILE).is_file():
        return ModelConfig.from_dict(json.loads((p / MODEL_CONFIG_FILE).read_text()))
    if (p / "config.json").is_file():
        return ModelConfig.from_hf_config(read_hf_config(p))
    return None


def _from_sizes(section, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=section.hidden_size, intermediate_size=section.intermediate_size,
        num_layers=section.num_layers, num_heads=section.num_heads, num_kv_heads=section.num_kv_heads,
        head_dim=section.head_dim, rope_theta=section.rope_theta, max_position_embeddings=section.max_position_embeddings,
        tie_word_embeddings=section.tie_word_embeddings)


def _shape(preset: str, checkpoint: str, sizes, vocab_size: int) -> tuple[ModelConfig, str]:
    """A model's shape: its named preset, else its checkpoint's saved config, else the config's sizes."""
    from alphallm_jax.models import presets

    if preset:
        return presets.get(preset), f"preset {preset}"
    saved = _model_config_at(checkpoint)
    if saved is not None:
        return saved, f"checkpoint {checkpoint}"
    if sizes is None:
        raise ValueError(f"no shape for a model: no preset, and {checkpoint!r} holds no readable checkpoint config")
    return _from_sizes(sizes, vocab_size), "config sizes"


def _train_shape(stage: str, section, dp: int, model_dtype: str, *, pairs: bool = False,
                 logits_chunk: int = 0) -> TrainShape:
    from alphallm_jax.train.trainer import TrainConfig

    tc = TrainConfig.from_config(section)
    micro = tc.batch_size // tc.grad_accum_steps * (2 if pairs else 1)  # DPO: chosen and rejected rows
    return TrainShape(stage, max(1, math.ceil(micro / dp)), int(tc.max_seq_len or 1024), tc.master_dtype,
                      tc.compute_dtype or model_dtype, logits_chunk,
                      microbatch_problem(tc.batch_size, tc.grad_accum_steps, dp), tc.remat, tc.grad_accum_steps)


def resolve_models(cfg, mesh) -> dict[str, ModelSpec]:
    """The policy, the critic and (when enabled) the fast-rollout policy of `cfg`, with their workloads."""
    dp = batch_shards(mesh)
    policy_cfg, policy_src = _shape(cfg.model.preset, cfg.model.checkpoint or cfg.critics.policy, cfg.base.model,
                                    cfg.base.tokenizer_vocab_size)
    policy_cfg = policy_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    search_len = min(cfg.search.max_len or cfg.sampling.max_len, policy_cfg.max_position_embeddings)
    batch = cfg.search.max_batch or cfg.sampling.max_batch
    rows = max(1, math.ceil(batch / dp))
    pt = cfg.policy_train
    policy_train = [_train_shape("sft", pt.sft, dp, policy_cfg.dtype, logits_chunk=pt.logits_chunk_size),
                    _train_shape("dpo", pt.dpo, dp, policy_cfg.dtype, pairs=True, logits_chunk=pt.logits_chunk_size)]
    if not cfg.model.preset and not cfg.model.checkpoint:  # the demo trains its base policy from scratch
        policy_train.insert(0, _train_shape("base", cfg.base.train, dp, policy_cfg.dtype))
    models = {"policy": ModelSpec("policy", policy_cfg, policy_src, train=tuple(policy_train),
                                  kv_rows=(cfg.search.pool_slots, *[batch] * WORKING_BATCHES), kv_len=search_len,
                                  infer_rows=rows, infer_len=search_len)}

    m = cfg.critics.model
    r = cfg.rollout_policy
    if m.init == "policy":
        critic_cfg, critic_src = policy_cfg, f"policy ({policy_src})"
    elif m.init == "checkpoint":
        critic_cfg, critic_src = _shape(m.preset, m.checkpoint, None, policy_cfg.vocab_size)
    elif m.init == "rollout_policy":  # the fast-rollout policy's backbone (the demo's critic)
        critic_cfg, src = _shape(r.model.preset, r.checkpoint, r.model, policy_cfg.vocab_size)
        critic_src = f"rollout policy ({src})"
    else:
        critic_cfg, critic_src = _from_sizes(m, policy_cfg.vocab_size), "config sizes (scratch)"
    critic_cfg = critic_cfg.replace(dtype=m.dtype, param_dtype=m.dtype if m.init != "policy" else policy_cfg.param_dtype)
    score_rows = max(1, math.ceil(cfg.critics.scoring.max_batch / dp))
    models["critic"] = ModelSpec("critic", critic_cfg, critic_src, critic_head_hidden=m.head_hidden,
                                 train=(_train_shape("critic", cfg.critics.train, dp, critic_cfg.dtype),),
                                 infer_rows=score_rows, infer_len=min(search_len, critic_cfg.max_position_embeddings))

    if cfg.rollout_policy.enabled:
        fast_cfg, fast_src = _shape(r.model.preset, r.checkpoint, r.model, policy_cfg.vocab_size)
        fast_cfg = fast_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        trained = not r.model.preset and not r.checkpoint  # the demo trains it; presets load one
        fast_len = min(search_len, fast_cfg.max_position_embeddings)
        models["rollout_policy"] = ModelSpec(
            "rollout_policy", fast_cfg, fast_src,
            train=(_train_shape("rollout", r.train, dp, fast_cfg.dtype),) if trained else (),
            kv_rows=(2, *[batch] * WORKING_BATCHES), kv_len=fast_len, infer_rows=rows, infer_len=fast_len)
    return models


# ------------------------------------------------------------------------------ byte counts


def abstract_state(spec: ModelSpec):
    """The model's parameters as an NNX state of ShapeDtypeStructs (`nnx.eval_shape`: nothing allocated)."""
    return _abstract_state(spec.model_cfg, spec.critic_head_hidden)


@functools.lru_cache(maxsize=16)
def _abstract_state(model_cfg: ModelConfig, critic_head_hidden: int | None):
    # Tracing a 70B model's init takes seconds; plans of several mesh variants share it.
    from flax import nnx

    from alphallm_jax.models.creation import abstract_model

    if critic_head_hidden is None:
        return nnx.state(abstract_model(model_cfg), nnx.Param)
    from alphallm_jax.models.critic import CriticHeadConfig, new_critic

    heads = CriticHeadConfig(hidden=critic_head_hidden)
    return nnx.state(nnx.eval_shape(lambda: new_critic(model_cfg, heads)), nnx.Param)


def parameter_bytes(state, mesh, rules: ShardingRules = ShardingRules()) -> tuple[int, int, int]:
    """(parameter count, per-device parameter bytes, per-device parameter count) on `mesh`."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    count = per_device_bytes = per_device_count = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape = tuple(var.shape)
        spec = logical_to_spec(logical_names(var), rules, shape=shape, mesh=mesh)
        shard = math.prod(NamedSharding(mesh, spec).shard_shape(shape))
        count += math.prod(shape)
        per_device_count += shard
        per_device_bytes += shard * np.dtype(var.get_value().dtype).itemsize
    return count, per_device_bytes, per_device_count


def kv_pool_bytes(spec: ModelSpec, mesh, rules: ShardingRules = ShardingRules()) -> int:
    """Per-device bytes of the sampler's caches of `kv_len` tokens (K and V, every layer): each cache's
    rows are split over (data, fsdp) and its kv heads over tensor when they divide, like `KVCache`."""
    from jax.sharding import NamedSharding

    from alphallm_jax.models.kv_cache import VALUE_NAMES, kv_shape

    c = spec.model_cfg
    total = 0
    for rows in spec.kv_rows:
        shape = kv_shape(c, rows, spec.kv_len)  # the keys: as many elements, split the same way
        shard = NamedSharding(mesh, logical_to_spec(VALUE_NAMES, rules, shape=shape, mesh=mesh)).shard_shape(shape)
        total += math.prod(shard) * 2 * c.num_layers * _BYTES[c.dtype]
    return total


def _split(n: int, parts: int) -> int:
    """A dimension's per-device size when sharded over `parts` devices (replicated when not divisible,
    as `logical_to_spec` does)."""
    return n // parts if n % parts == 0 else n


def _layer_bytes_per_token(c: ModelConfig, seq: int, tensor: int, p: int) -> int:
    """What one layer keeps per token for the backward pass, per device (heads and MLP split over tensor):
    the norm inputs and outputs, q/k/v and the float32 RoPE'd q/k, float32 scores and probabilities
    over `seq` keys (the attention is not fused), the attention output, and the MLP's gate, up, activation
    and product."""
    d, hd = c.hidden_size, c.head_dim
    h, k, i = _split(c.num_heads, tensor), _split(c.num_kv_heads, tensor), _split(c.intermediate_size, tensor)
    return p * (4 * d + (2 * h + 2 * k) * hd + 4 * i) + 4 * (h + k) * hd + h * seq * (4 + p)


def train_activation_bytes(c: ModelConfig, shape: TrainShape, tensor: int, *, lm_head: bool,
                           remat: str = "none") -> int:
    """Per-device activations of one train step (micro-batch `sequences_per_device` x `seq_len`).

    remat "none": every layer's intermediates are kept. "full" (a train section's `remat`, per-layer
    checkpointing): each layer keeps only its input, and one layer's intermediates are rebuilt at a time.
    Plus the float32 logits and their gradient (chunked when `logits_chunk` > 0) for a language-model
    loss, and the embedding output.
    """
    p = _BYTES[shape.compute_dtype]
    tokens = shape.sequences_per_device * shape.seq_len
    per_layer = tokens * _layer_bytes_per_token(c, shape.seq_len, tensor, p)
    layers = c.num_layers * per_layer if remat == "none" else c.num_layers * tokens * c.hidden_size * p + per_layer
    logits = 0
    if lm_head:
        positions = shape.sequences_per_device * (min(shape.logits_chunk, shape.seq_len) if shape.logits_chunk
                                                  else shape.seq_len)
        logits = positions * _split(c.vocab_size, tensor) * 8
    return layers + logits + tokens * c.hidden_size * p


def inference_activation_bytes(c: ModelConfig, rows: int, seq: int, tensor: int) -> int:
    """The transient working set of one layer of a `rows x seq` prefill (nothing is kept between layers)."""
    p = _BYTES[c.dtype]
    return rows * seq * _layer_bytes_per_token(c, seq, tensor, p) + rows * _split(c.vocab_size, tensor) * 4


# --------------------------------------------------------------------------------- the plan


def plan_model(spec: ModelSpec, mesh, hbm: int | None, rules: ShardingRules = ShardingRules()) -> dict[str, Any]:
    tensor = mesh.shape["tensor"]
    count, param_bytes, shard_count = parameter_bytes(abstract_state(spec), mesh, rules)
    c = spec.model_cfg
    optimizer = gradients = 0
    activations = inference_activation_bytes(c, spec.infer_rows, spec.infer_len, tensor) if spec.infer_rows else 0
    detail: dict[str, Any] = {"stage": "inference", "rows_per_device": spec.infer_rows, "seq_len": spec.infer_len}
    if spec.train:
        activations = 0
    lm_head = spec.critic_head_hidden is None
    for t in spec.train:
        master = _BYTES[t.master_dtype] if t.master_dtype else _BYTES[c.param_dtype]
        # Remat scans over a stacked copy of the layers' (master) parameters and builds their gradient
        # stacked too (`decoder.rematerialised_layers`): two copies of the model's, an upper bound.
        stacked = 2 * shard_count * master
        copy = master if (t.master_dtype and t.master_dtype != c.param_dtype) else 0
        optimizer = max(optimizer, shard_count * (2 * master + copy))
        gradients = max(gradients, shard_count * master)
        act = train_activation_bytes(c, t, tensor, lm_head=lm_head, remat="full" if t.remat else "none") + (
            stacked if t.remat else 0)
        if act > activations:
            activations = act
            detail = {"stage": t.stage, "sequences_per_device": t.sequences_per_device, "seq_len": t.seq_len,
                      "remat": "full" if t.remat else "none",
                      "full_remat_bytes": train_activation_bytes(c, t, tensor, lm_head=lm_head, remat="full")
                      + stacked}
    per_device = {"params": param_bytes, "optimizer": optimizer, "gradients": gradients,
                  "kv_pool": kv_pool_bytes(spec, mesh, rules), "activations": activations}
    inference = inference_activation_bytes(c, spec.infer_rows, spec.infer_len, tensor) if spec.infer_rows else 0
    # The model's two resident sets never overlap: serving the search (cache, one prefill) and training.
    serving = param_bytes + per_device["kv_pool"] + inference
    training = param_bytes + optimizer + gradients + activations if spec.train else 0
    peak = max(serving, training)
    problems = [f"{t.stage} training: {t.problem}" for t in spec.train if t.problem]
    return {"param_count": count, "devices": int(mesh.size), "source": spec.source, "dtype": c.dtype,
            "param_dtype": c.param_dtype, "trained": bool(spec.train), "per_device_bytes": per_device,
            "peak_per_device_bytes": peak, "fits": _fits(peak, hbm, refused=bool(problems)),
            "problems": problems, "activations_detail": {**detail, "inference_bytes": inference}}


def _stages(models: dict[str, dict[str, Any]], hbm: int | None) -> dict:
    """What is resident at once: the search (every model's parameters, the samplers' caches, one prefill
    each) and each model's training."""
    search = 0
    for m in models.values():
        b = m["per_device_bytes"]
        search += b["params"] + b["kv_pool"] + m["activations_detail"]["inference_bytes"]
    stages = {"search": {"per_device_bytes": search, "fits": _fits(search, hbm)}}
    for name, m in models.items():
        if m["trained"]:
            b = m["per_device_bytes"]
            v = b["params"] + b["optimizer"] + b["gradients"] + b["activations"]
            stages[f"{name}_training"] = {"per_device_bytes": v, "fits": _fits(v, hbm, refused=bool(m["problems"]))}
    return stages


def _critic_data_stage(cfg, specs: dict[str, ModelSpec], models: dict[str, dict[str, Any]], mesh,
                       hbm: int | None) -> dict:
    """The critics' data stage: the policy rolls out on D0 with a sampler that keeps states, so its whole
    pool (`critics.data.pool_slots`) is resident beside the policy's parameters, the working caches of its
    `sampling.max_batch` rows and one prefill of them."""
    policy = specs["policy"]
    working = [cfg.sampling.max_batch] * WORKING_BATCHES
    caches = dataclasses.replace(policy, kv_rows=(cfg.critics.data.pool_slots, *working))
    rows = max(1, math.ceil(cfg.sampling.max_batch / batch_shards(mesh)))
    prefill = inference_activation_bytes(policy.model_cfg, rows, policy.kv_len, mesh.shape["tensor"])
    v = models["policy"]["per_device_bytes"]["params"] + kv_pool_bytes(caches, mesh) + prefill
    return {"critic_data": {"per_device_bytes": v, "fits": _fits(v, hbm)}}


def _fits(per_device: int, hbm: int | None, *, refused: bool = False) -> bool | None:
    """Whether `per_device` bytes fit the device (None: its memory is unknown); never for a stage the
    trainer would refuse."""
    return False if refused else (None if hbm is None else per_device <= FIT_FRACTION * hbm)


def allocator_limit(device) -> int | None:
    """The bytes the device's allocator gives JAX (`memory_stats()["bytes_limit"]`), None when unreported."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


SKIP_MEMORY_CHECK_ENV = "ALPHALLM_SKIP_MEMORY_CHECK"


# What shrinks each stage of the plan (the error names those of the stages that do not fit).
_STAGE_KEYS = {"search": "search.pool_slots or search.max_batch",
               "critic_data": "critics.data.pool_slots or sampling.max_batch",
               "policy_training": "policy_train.sft/dpo grad_accum_steps or max_seq_len",
               "critic_training": "critics.train.grad_accum_steps or max_seq_len",
               "rollout_policy_training": "rollout_policy.train.grad_accum_steps or max_seq_len"}


def check_device_memory(cfg, skip: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a run on accelerators whose memory the plan says it outgrows, instead of
    failing hours in. For a config that names its devices' memory (`mesh.hbm_gib`, as the paper presets
    do), run on GPUs or TPUs: each stage of the plan (but those named in `skip`: stages a resumed loop
    finished or a config never runs, `loop.finished_plan_stages`) must fit the plan's own bar
    (`FIT_FRACTION` of `mesh.hbm_gib`) and this process's allocator limit. On GPUs JAX takes 75% of the
    memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says more, so the error names the fraction the run
    needs. CPU devices are not checked (there `mesh.hbm_gib` describes the target hardware, not this
    machine). The plan is an estimate: `ALPHALLM_SKIP_MEMORY_CHECK=1` runs anyway."""
    import jax

    device = jax.local_devices()[0]
    if not cfg.mesh.hbm_gib or device.platform not in ("gpu", "tpu") or os.environ.get(SKIP_MEMORY_CHECK_ENV) == "1":
        return
    plan = make_plan(cfg, fill=False)  # the stages alone: the fill slots are `alphallm plan`'s to show
    needs = {name: st["per_device_bytes"] for name, st in plan["stages"].items() if name not in skip}
    hbm = cfg.mesh.hbm_gib * GIB
    limit = allocator_limit(device)
    over = {name: b for name, b in needs.items() if b > min(FIT_FRACTION * hbm, limit or hbm)}
    if not over:
        return
    worst = ", ".join(f"{name} stage {b / GIB:.1f} GiB" for name, b in sorted(over.items(), key=lambda kv: -kv[1]))
    shrink = ("shrink " + "; ".join(_STAGE_KEYS[name] for name in over if name in _STAGE_KEYS)
              + f" (`alphallm plan` shows every stage, and the pool slots that fill {POOL_FILL_FRACTION:.0%} of "
              f"the memory), or take a larger mesh, or set {SKIP_MEMORY_CHECK_ENV}=1 to run on the estimate's risk")
    if max(over.values()) > FIT_FRACTION * hbm:
        raise ValueError(f"mesh.hbm_gib={cfg.mesh.hbm_gib} does not hold {worst} per device (the plan fits a stage in "
                         f"{FIT_FRACTION:.0%} of it, {FIT_FRACTION * hbm / GIB:.1f} GiB): {shrink}")
    if device.platform == "gpu":
        fraction = max(over.values()) / hbm
        raise ValueError(
            f"mesh.hbm_gib={cfg.mesh.hbm_gib} plans {worst} per device, but {device.device_kind}'s allocator gives "
            f"JAX {limit / GIB:.1f} GiB here: set XLA_PYTHON_CLIENT_MEM_FRACTION above {fraction:.2f} (JAX takes .75 "
            f"by default; .92 is the launch docs' setting), or {shrink}")
    raise ValueError(f"mesh.hbm_gib={cfg.mesh.hbm_gib} plans {worst} per device, but {device.device_kind} gives JAX "
                     f"{limit / GIB:.1f} GiB here (is mesh.hbm_gib this chip's?): {shrink}")


def make_plan(cfg, *, fill: bool = True) -> dict[str, Any]:
    """The JSON-ready plan of `cfg` (see the module docstring); `fill`: with the pool slots that
    `fill_kv_pools` would choose (`pools.*.fill_slots`) when the devices' memory is known."""
    mesh = abstract_mesh(cfg)
    hbm, hbm_source = device_memory_bytes(cfg)
    specs = resolve_models(cfg, mesh)
    models = {name: plan_model(spec, mesh, hbm) for name, spec in specs.items()}
    return {"mesh": {**{a: int(mesh.shape[a]) for a in MESH_AXES}, "devices": int(mesh.size),
                     "device": cfg.mesh.device or None, "device_memory_bytes": hbm,
                     "device_memory_source": hbm_source, "fit_fraction": FIT_FRACTION},
            "models": models, "stages": {**_stages(models, hbm), **_critic_data_stage(cfg, specs, models, mesh, hbm)},
            "pools": _pools(cfg, specs["policy"], fill_kv_pools(cfg) if fill and hbm else None),
            "train_steps": {t.stage: {"sequences_per_device": t.sequences_per_device, "seq_len": t.seq_len,
                                      "grad_accum_steps": t.grad_accum_steps, "remat": t.remat}
                            for spec in specs.values() for t in spec.train},
            "problems": [f"{name}: {p}" for name, m in models.items() for p in m["problems"]]}


def _pools(cfg, policy: ModelSpec, filled: dict[str, int] | None) -> dict[str, dict[str, int]]:
    """The state-keeping samplers' pools: slots (one of them, slot 0, stays empty), tokens per slot, the
    rows of one batch beside them, and the slots `fill_kv_pools` would choose (`filled`, when known)."""
    pools = {"search": {"slots": int(cfg.search.pool_slots), "tokens_per_slot": policy.kv_len,
                        "batch_rows": int(cfg.search.max_batch or cfg.sampling.max_batch)},
             "critic_data": {"slots": int(cfg.critics.data.pool_slots), "tokens_per_slot": policy.kv_len,
                             "batch_rows": int(cfg.sampling.max_batch)}}
    for name, slots in (filled or {}).items():
        pools[name]["fill_slots"] = slots
    return pools


def fill_kv_pools(cfg, fraction: float = POOL_FILL_FRACTION) -> dict[str, int]:
    """Slots for the two samplers that keep states, the search's (`search.pool_slots`) and the critic
    data's (`critics.data.pool_slots`), each in a stage of its own: as many as bring the stage to
    `fraction` of the device memory (`mesh.hbm_gib`) beside everything else the plan puts in it (every
    resident model's parameters, each sampler's working caches of its batch, one prefill). More cached
    states means fewer evicted and rebuilt by prefilling their prefixes again; `fraction` stays below
    `FIT_FRACTION` to leave room for what the plan does not count. A multiple of data x fsdp (a pool's
    rows are split over them), and never below one batch of the stage's rows plus the pool's empty slot
    even where that does not fit (the plan then says so). Returns {"search": slots, "critic_data": slots}."""
    import copy

    empty = copy.deepcopy(cfg)
    empty.search.pool_slots = empty.critics.data.pool_slots = 0
    plan = make_plan(empty, fill=False)
    hbm = plan["mesh"]["device_memory_bytes"]
    if not hbm:
        raise ValueError("fill_kv_pools needs the devices' memory: set mesh.hbm_gib")
    mesh = abstract_mesh(empty)
    dp = batch_shards(mesh)
    policy = resolve_models(empty, mesh)["policy"]
    slot_bytes = kv_pool_bytes(dataclasses.replace(policy, kv_rows=(dp,)), mesh)  # one slot per (data, fsdp) shard
    batches = {"search": cfg.search.max_batch or cfg.sampling.max_batch, "critic_data": cfg.sampling.max_batch}
    slots = {}
    for stage, batch in batches.items():
        free = fraction * hbm - plan["stages"][stage]["per_device_bytes"]
        # At least a batch's states, beside the pool's one empty slot.
        slots[stage] = max(int(max(free, 0) // slot_bytes) * dp, math.ceil((batch + 1) / dp) * dp)
    return slots


def format_plan(plan: dict[str, Any]) -> str:
    """A console table: one row per model, sizes in GiB per device."""
    mesh = plan["mesh"]
    hbm = mesh["device_memory_bytes"]
    lines = [f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} ({mesh['devices']} devices"
             + (f", {mesh['device']}" if mesh["device"] else "")
             + (f", {hbm / GIB:.1f} GiB each" if hbm else "") + ")"]
    keys = ("params", "optimizer", "gradients", "kv_pool", "activations")
    lines.append(f"{'model':<15} {'parameters':>14} " + " ".join(f"{k:>11}" for k in keys) + f" {'peak':>9}  fits")
    for name, m in plan["models"].items():
        b = m["per_device_bytes"]
        lines.append(f"{name:<15} {m['param_count']:>14,} " + " ".join(f"{b[k] / GIB:>11.2f}" for k in keys)
                     + f" {m['peak_per_device_bytes'] / GIB:>9.2f}  {_yes_no(m['fits'])}")
    lines.append("stages: " + ", ".join(f"{k} {v['per_device_bytes'] / GIB:.2f} GiB ({_yes_no(v['fits'])})"
                                        for k, v in plan["stages"].items()))
    pools = plan["pools"]
    lines.append("KV pools: " + ", ".join(f"{k.replace('_', ' ')} {v['slots']} slots" for k, v in pools.items())
                 + f" of {pools['search']['tokens_per_slot']} tokens"
                 + (f" (filling {POOL_FILL_FRACTION:.0%} of the memory: "
                    + ", ".join(str(v["fill_slots"]) for v in pools.values()) + ")"
                    if all("fill_slots" in v for v in pools.values()) else ""))
    lines.append("train steps (sequences per device x accumulation steps): " + ", ".join(
        f"{stage} {t['sequences_per_device']} x {t['grad_accum_steps']} of {t['seq_len']} tokens"
        + (" (remat)" if t["remat"] else "") for stage, t in plan["train_steps"].items()))
    dp = mesh["data"] * mesh["fsdp"]
    for k, v in pools.items():
        name = k.replace("_", " ")
        if v["slots"] - 1 < v["batch_rows"]:  # slot 0 stays empty
            lines.append(f"NOTE the {name} pool ({v['slots']} slots) holds fewer states than one batch "
                         f"({v['batch_rows']} rows): states are evicted and rebuilt every round")
        if v["slots"] % dp:
            lines.append(f"NOTE the {name} pool ({v['slots']} slots) does not split over data x fsdp = {dp}: "
                         f"every device holds all of it")
    lines += [f"PROBLEM {p}" for p in plan["problems"]]
    return "\n".join(lines)


def _yes_no(fits: bool | None) -> str:
    return "?" if fits is None else ("yes" if fits else "NO")
