"""The project's config schema: every field with its default, shared by every config file.

Config files in `configs/` start from `default_config()` and override fields; ml-collections locks
the result, so `--config.eval.limt=5` (a typo) fails instead of being silently ignored.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "arith"  # gsm8k | math | arith: picks the grader and the answer marker

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # "" -> $ALPHALLM_DATA_DIR or ../shared/data beside the repo
    c.data.prompt_format = "plain"  # plain | fewshot | chat
    c.data.num_exemplars = 4  # for fewshot
    c.data.exemplar_seed = 0
    # The built-in arith task's difficulty knobs (alphallm_jax.data.arith.ArithConfig); the splits are
    # generated from `seed`. `arith_hard` makes the arith:test_hard split.
    c.data.arith = ml_collections.ConfigDict(dict(
        min_steps=2, max_steps=4, operand_min=2, operand_max=20, factor_max=6, value_min=2, value_max=200))
    c.data.arith_hard = ml_collections.ConfigDict(dict(
        min_steps=4, max_steps=6, operand_min=2, operand_max=30, factor_max=9, value_min=2, value_max=500))

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # an HF or orbax directory
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_len = 1024  # longest sequence a cached state may reach
    c.sampling.pool_slots = 256
    c.sampling.max_batch = 64

    # The built-in demo's base policy, trained from scratch on labelled D0 (alphallm train-base).
    c.base = ml_collections.ConfigDict()
    c.base.train_split = "arith:train"
    c.base.dev_split = "arith:dev"
    c.base.num_train = 0  # 0: the whole split
    c.base.num_dev = 0
    c.base.tokenizer_vocab_size = 768
    c.base.model = ml_collections.ConfigDict(dict(
        hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=48,
        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True))
    c.base.train = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, end_learning_rate=1e-4, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
        max_grad_norm=1.0, batch_size=32, epochs=2, max_seq_len=384, pad_to_multiple=32, eval_every=0,
        early_stopping_patience=3, checkpoint_every=100, keep_checkpoints=2, seed=0))
    c.base.eval_methods = ("greedy", "pass@16")

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "arith:test"  # a named split (see alphallm_jax.data.loaders) or a JSONL path
    c.eval.limit = 0  # 0: the whole split
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 256
    c.eval.temperature = 0.7  # for sampling methods (greedy ignores it)
    c.eval.top_p = 1.0
    c.eval.top_k = 0
    c.eval.stop = ("\n\n", "\nQuestion:")  # a solution ends at EOS or at one of these
    c.eval.batch_size = 64  # problems per sampler call
    return c


def mesh_from_config(cfg: ml_collections.ConfigDict):
    """The configured mesh, or None for a single device."""
    import jax

    from alphallm_jax.models.sharding import make_mesh

    shape = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if shape == (1, 1, 1) and len(jax.devices()) == 1:
        return None
    if -1 in shape:  # one axis may take whatever devices remain
        known = -1 * int(shape[0] * shape[1] * shape[2])
        shape = tuple(len(jax.devices()) // known if s == -1 else s for s in shape)
    if shape == (1, 1, 1):
        return None
    return make_mesh(*shape)
