"""The papers' settings as configs: shared pieces of `configs/llama2_7b_gsm8k.py` and its siblings.

A preset names every model's shape (`alphallm_jax.models.presets`), so `alphallm plan` sizes it without
the weights; the checkpoints themselves are paths the user sets (`--config.model.checkpoint=DIR`, an HF
or orbax directory). Mesh shapes are variants of each preset file (`configs/llama2_70b_gsm8k.py:v5p-128`);
the first variant listed is the default.

Hyperparameters: AlphaLLM (arXiv 2404.12253) and AlphaLLM-CPL (arXiv 2410.06508, appendix A):
SFT lr 5e-6 decaying to 1e-6 with 10% warm-up, batch 128, at most 3 epochs, early stopping on a dev
split; preference learning batch 64, two offline epochs, CPL balance alpha = 0.5. Two values move to the
value scale here, where every critic score is a probability: the pair margin tau (the paper's 1) is 0.5,
and importance-weighted expansion's alpha (the paper's 1) is 10.
CPL's per-model DPO learning rates (its Table 2) are not in our copy of the paper: `DPO_LR` is the usual
rate for DPO on 7B models; set `--config.policy_train.dpo.learning_rate` to yours.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from alphallm_jax.config import config_section, default_config
from alphallm_jax.train.batching import valid_accum_steps

V5P_HBM_GIB = 95.0  # per TPU v5p chip (one JAX device: the chip's two TensorCores act as one)
V5E_HBM_GIB = 16.0  # per TPU v5e chip
H100_HBM_GIB = 80.0  # per NVIDIA H100 SXM (JAX takes 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says more)

SFT_BATCH = 128
DPO_BATCH = 64
DPO_LR = 5e-7


@dataclasses.dataclass(frozen=True)
class MeshVariant:
    """One hardware layout: mesh axes, what runs it, and the micro-batch per device that fits."""

    data: int
    fsdp: int
    tensor: int
    device: str
    hbm_gib: float
    micro_batch: int  # sequences per device per gradient-accumulation step

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor


# 7B/8B models: FSDP within one host or slice.
MESHES_7B = {
    "v5p-8": MeshVariant(1, 4, 1, "TPU v5p-8 (4 chips, one host)", V5P_HBM_GIB, 1),
    # 16 GiB chips: tensor parallelism splits the attention and MLP activations of the train step.
    "v5e-32": MeshVariant(1, 8, 4, "TPU v5e-32 (32 chips, 8 hosts)", V5E_HBM_GIB, 1),
    "gpu-8": MeshVariant(1, 8, 1, "8x H100 80GB (one host)", H100_HBM_GIB, 1),
}
# 70B: FSDP across hosts, tensor parallelism over the fast local interconnect (8 kv heads: tensor <= 8).
MESHES_70B = {
    "v5p-128": MeshVariant(1, 16, 4, "TPU v5p-128 (64 chips, 16 hosts)", V5P_HBM_GIB, 1),
    "v5p-64": MeshVariant(1, 8, 4, "TPU v5p-64 (32 chips, 8 hosts)", V5P_HBM_GIB, 1),
    # 16 GiB chips: the policy's train step fits only with per-layer rematerialisation (`apply_mesh`
    # sets `remat` where the plan needs it).
    "v5e-256": MeshVariant(1, 32, 8, "TPU v5e-256 (256 chips, 64 hosts)", V5E_HBM_GIB, 1),
    "gpu-64": MeshVariant(1, 8, 8, "8 hosts x 8 H100 80GB", H100_HBM_GIB, 1),
}

# Imagination for real models: MetaMath-style variation of a D0 seed question.
GSM8K_INSTRUCTION = ("Below are grade-school math word problems. Write one new problem that is a variation "
                     "of the last one, with {variation}. It must be solvable and have a single numeric answer.")
MATH_INSTRUCTION = ("Below are competition mathematics problems. Write one new problem that is a variation of "
                    "the last one, with {variation}. It must be well posed and have a single final answer.")


def apply_mesh(c: ml_collections.ConfigDict, variants: dict[str, MeshVariant], variant: str | None,
               file_name: str) -> None:
    """The variant's mesh, memory and micro-batch (`mesh.micro_batch`), then everything sized for them
    (`size_for_mesh`). Call it last: the sizes are for the config as it stands. The CLI sizes a config
    with a `mesh.micro_batch` again after the command line's overrides (`resize_after_overrides`)."""
    name = variant or next(iter(variants))
    if name not in variants:
        raise ValueError(f"unknown variant {name!r} of {file_name}; known: {', '.join(variants)}")
    m = variants[name]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = m.data, m.fsdp, m.tensor
    c.mesh.device, c.mesh.hbm_gib, c.mesh.micro_batch = m.device, m.hbm_gib, m.micro_batch
    size_for_mesh(c, f"{file_name}:{name}")


# The train sections a preset sizes for its mesh, with the rows each example takes (DPO's are pairs).
_TRAIN_SECTIONS = {"policy_train.sft": 1, "policy_train.dpo": 2, "critics.train": 1}
_REMAT_STAGES = {"policy_training": ("policy_train.sft", "policy_train.dpo"), "critic_training": ("critics.train",)}
_POOLS = {"search": "search.pool_slots", "critic_data": "critics.data.pool_slots"}
# Every key `size_for_mesh` sets.
SIZED_KEYS = (*(f"{s}.{k}" for s in _TRAIN_SECTIONS for k in ("grad_accum_steps", "remat")), *_POOLS.values())


def size_for_mesh(c: ml_collections.ConfigDict, where: str, *, keep: tuple[str, ...] = ()) -> None:
    """What a preset sizes for its mesh (`mesh.*`, `mesh.micro_batch` sequences per device and step):
    gradient accumulation so that each device holds `micro_batch` sequences (SFT, DPO's pairs and the
    critic alike); per-layer rematerialisation (`remat`) for the train sections whose step the plan does
    not fit without it; and the KV pools of the two samplers that keep states, the search's and the
    critic data's (each in a stage of its own), filled to what the plan leaves of the devices' memory
    (`plan.fill_kv_pools`). `keep`: keys of `SIZED_KEYS` to leave as they are (a command-line override
    set them)."""
    from alphallm_jax.pipeline.plan import FIT_FRACTION, fill_kv_pools, make_plan

    dp = c.mesh.data * c.mesh.fsdp
    for path, rows_per_example in _TRAIN_SECTIONS.items():
        section, _ = config_section(c, f"{path}.remat")
        if f"{path}.grad_accum_steps" not in keep:
            section.grad_accum_steps = accum_steps_for(section.batch_size, dp, c.mesh.micro_batch,
                                                       rows_per_example, where)
        if f"{path}.remat" not in keep:
            section.remat = False
    # Per-layer rematerialisation where a model's train step does not fit without it (each layer's
    # forward runs twice, 7% more time per step on the 30M benchmark model, so only there).
    plan = make_plan(c, fill=False)
    bar = FIT_FRACTION * plan["mesh"]["device_memory_bytes"]
    for stage, paths in _REMAT_STAGES.items():
        if stage in plan["stages"] and plan["stages"][stage]["per_device_bytes"] > bar:
            for path in paths:
                if f"{path}.remat" not in keep:
                    config_section(c, f"{path}.remat")[0].remat = True
    for stage, slots in fill_kv_pools(c).items():
        if _POOLS[stage] not in keep:
            section, key = config_section(c, _POOLS[stage])
            section[key] = slots


def resize_after_overrides(c: ml_collections.ConfigDict, overrides: list[str], where: str) -> list[str]:
    """A preset's config (one with a `mesh.micro_batch`) sized again after the command line's overrides
    (`overrides`: their dotted keys below `config.`), which may have changed the mesh, a batch or a
    length: every key of `SIZED_KEYS` an override did not set. Returns those keys (none for a config
    without `mesh.micro_batch` or without overrides)."""
    if not c.mesh.get("micro_batch") or not overrides:
        return []
    keep = tuple(k for k in SIZED_KEYS if k in overrides)
    size_for_mesh(c, where, keep=keep)
    return [k for k in SIZED_KEYS if k not in keep]


def accum_steps_for(batch_size: int, dp: int, micro_batch: int, rows_per_example: int, where: str) -> int:
    """The most gradient-accumulation steps whose microbatch still divides over the `dp` devices (the
    trainer's rule, counted in examples: DPO's are pairs of two rows) and gives each device about
    `micro_batch` rows; at least one example per device."""
    valid = valid_accum_steps(batch_size, dp)
    if not valid:
        raise ValueError(f"{where}: batch_size {batch_size} does not divide over data*fsdp = {dp} devices")
    rows_per_device = {a: batch_size // a // dp * rows_per_example for a in valid}
    enough = [a for a in valid if rows_per_device[a] >= micro_batch]
    return max(enough) if enough else min(valid)


def paper_config(*, task: str, policy_preset: str, prompt_format: str, mcts_preset: str,
                 max_len: int, max_solution_tokens: int, train_seq_len: int,
                 search_batch: int = 128) -> ml_collections.ConfigDict:
    """The settings every paper preset shares; the preset files add their models and meshes.

    max_len: the longest prompt plus solution the samplers hold; train_seq_len: the longest training
    sequence (prompt plus one trajectory), which sets the train step's activations; search_batch: rows
    per sampler and critic call, in the search and every other stage (one full-length prefill of them
    must fit next to the caches).
    """
    c = default_config()
    c.task = task
    c.model.preset = policy_preset
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.data.prompt_format = prompt_format
    c.sampling.max_len = max_len
    c.sampling.pool_slots = 512
    c.sampling.max_batch = search_batch  # the critic data's and evaluation's rows per call: the search's

    train, eval_split = ("gsm8k:train", "gsm8k:test") if task == "gsm8k" else ("math:train4500", "math:math500")
    held_out = f"{task}:train_dev"
    num_train = 7473 - 500 if task == "gsm8k" else 4500 - 500
    c.base.train_split, c.base.dev_split = train, held_out  # D0: the labelled training split
    c.eval.split = eval_split
    c.eval.max_new_tokens = max_solution_tokens
    c.eval.methods = ("greedy", "maj@16")
    c.eval.temperature = 0.7
    c.eval.batch_size = 256
    if task == "math":
        c.eval.stop = ("\nProblem:", "\nQuestion:")

    # Critics: rollouts of pi_0 on D0 (the paper: 50 trajectories per prompt), calibrated on a held-out tail.
    c.critics.train_split, c.critics.num_train_prompts = train, num_train
    c.critics.dev_split, c.critics.num_dev_prompts = held_out, 500
    c.critics.data.update(dict(num_solutions=16, num_rollouts=4, max_new_tokens=max_solution_tokens,
                               max_step_tokens=128, max_steps=16, prompts_per_chunk=64, pool_slots=4096))
    c.critics.train.update(dict(learning_rate=1e-5, end_learning_rate=1e-6, warmup_ratio=0.1, batch_size=128,
                                epochs=2, max_seq_len=train_seq_len, compute_dtype="bfloat16"))
    c.critics.model.dtype = "bfloat16"
    c.critics.scoring.max_batch = search_batch

    c.search.mcts.preset = mcts_preset
    # Importance-weighted expansion, n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t))): the value
    # head's v lies in [0, 1], so with the paper's alpha = 1 floor(I(s)) + 1 is 1 and n(s) never leaves
    # c_min(t) (the component would do nothing). alpha = c_max(t > 0) = 10 spans c_min(t)..c_max(t) below
    # the root as I(s) spans [0, 1].
    c.search.mcts.alpha = 10.0
    c.search.pool_slots = 8192
    c.search.max_batch = search_batch
    c.search.max_len = max_len
    c.search.options.max_solution_tokens = max_solution_tokens

    # AlphaLLM's SFT round, then CPL's curriculum preference learning.
    c.policy_train.sft.update(dict(learning_rate=5e-6, end_learning_rate=1e-6, warmup_ratio=0.1,
                                   schedule="linear", weight_decay=0.0, batch_size=SFT_BATCH, epochs=3,
                                   max_seq_len=train_seq_len, early_stopping_patience=1, compute_dtype="bfloat16"))
    c.policy_train.dpo.update(dict(learning_rate=DPO_LR, end_learning_rate=DPO_LR / 10, warmup_ratio=0.1,
                                   batch_size=DPO_BATCH, epochs=2, max_seq_len=train_seq_len,
                                   compute_dtype="bfloat16"))
    # The pair margin: a complete trajectory's Q (its ORM, the paper's terminal reward) and the value-only
    # search's every Q lie in [0, 1], where the paper's margin of 1 admits no pair (`check_pair_margin`
    # refuses it). The paper does not state its value scale; half the range, as 1 is of a value in [-1, 1],
    # keeps its meaning of a clear gap.
    c.policy_train.tau = 0.5
    c.policy_train.alpha = 0.5
    c.policy_train.beta = 0.1
    c.policy_train.ordering = "cpl"
    c.policy_train.logits_chunk_size = 256  # 32k-128k vocabularies: never materialise [b, s, vocab]

    # Imagination: MetaMath-style variations of D0 questions (paper: 6.4k and 7.9k prompts per GSM8K round,
    # 5.9k for MATH).
    c.synthesis.update(dict(method="fewshot", num_exemplars=4, temperature=0.8, top_p=0.95,
                            max_new_tokens=256 if task == "gsm8k" else 512,
                            num_prompts=6400 if task == "gsm8k" else 5900,
                            instruction=GSM8K_INSTRUCTION if task == "gsm8k" else MATH_INSTRUCTION))
    c.synthesis.dedup.update(dict(test_threshold=0.6, d0_threshold=0.8, synthetic_threshold=0.8))
    # Real questions ask in many ways ("How many hours will it take her...", "Calculate ..."): no grounding
    # rule (it would drop 7% of GSM8K's own questions); longer texts; a 5-gram may recur four times ("one-third
    # of the time on ..." three times is a question, not a sampling loop). These rules keep 99.6% of GSM8K's
    # 8,792 train and test questions.
    c.synthesis.form.update(dict(require_grounded=False, max_chars=1000, max_questions=2, max_repeats=4))
    if task == "math":  # MATH problems often state a task ("Find x.") in a few words ("Simplify $\sqrt{242}$.")
        # and may have no digits or span lines: these rules keep 497 of MATH500's 500 problems.
        c.synthesis.form.update(dict(require_question_mark=False, require_number=False, max_chars=1500,
                                     min_words=2))
        c.synthesis.stop = ("\n\nQuestion:", "\nAnswer:")
        c.synthesis.variations = ("different numbers", "a different quantity asked for", "a related setting")
    return c


def value_guided_search(c: ml_collections.ConfigDict) -> None:
    """CPL's search: guided by the value network alone ("due to computation budget limitation"): no PRM
    term and no fast rollouts."""
    c.search.mcts.beta_prm = 0.0
    c.search.mcts.beta_orm = 0.0
    c.search.mcts.num_rollouts = 0
    c.rollout_policy.enabled = False
