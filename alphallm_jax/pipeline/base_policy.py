"""The built-in demo's base policy: a tokenizer and a tiny Llama trained from scratch on labelled D0.

Stages, each skipped when its artifact exists (a rerun resumes; the trainer resumes mid-run):
  1. `tokenizer.model`: SentencePiece trained on D0's questions and solutions (digits split).
  2. `train/`: SFT of a tiny `Decoder` (the same NNX code as the real models) on D0 with the
     shared trainer, early-stopped on the dev split.
  3. `policy/`: the trained model and tokenizer as a Hugging Face checkpoint (+ `DONE` marker).
It is deliberately small and briefly trained, so that search and self-training have room to help.
"""

from __future__ import annotations

import logging
import time

from alphallm_jax.data.prompts import format_prompt, format_solution
from alphallm_jax.data.spm_training import SPECIAL_IDS, train_sentencepiece
from alphallm_jax.models import ModelConfig, Tokenizer, create_model
from alphallm_jax.models.hf_io import save_hf_checkpoint
from alphallm_jax.pipeline.evaluation import load_split
from alphallm_jax.train.batching import SFTExample
from alphallm_jax.train.losses import make_sft_loss
from alphallm_jax.train.trainer import TrainConfig, Trainer
from alphallm_jax.utils.io import as_path, atomic_write_json

log = logging.getLogger(__name__)
DONE = "DONE"


def sft_examples(problems, tokenizer: Tokenizer, prompt_format: str) -> list[SFTExample]:
    """(prompt, reference solution + EOS) token pairs; the loss covers the solution only."""
    examples = []
    for p in problems:
        prompt = format_prompt(p, prompt_format)
        response = tokenizer.encode(format_solution(p.solution, p.task, p.answer)) + [tokenizer.eos_ids[0]]
        examples.append(SFTExample(tokenizer.encode(prompt, add_bos=True), response))
    return examples


def model_config_from(cfg, tokenizer: Tokenizer) -> ModelConfig:
    m = cfg.base.model
    return ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=SPECIAL_IDS["bos_id"],
        eos_token_ids=(SPECIAL_IDS["eos_id"],), pad_token_id=SPECIAL_IDS["pad_id"])


def train_base_policy(cfg, workdir, *, mesh=None) -> dict:
    """Train (or resume) the demo's base policy under `workdir/base`; returns its record."""
    base_dir = as_path(workdir) / "base"
    policy_dir = base_dir / "policy"
    if (policy_dir / DONE).exists():
        return {"policy": str(policy_dir), "skipped": True}
    start = time.time()
    d0 = load_split(cfg, cfg.base.train_split, cfg.base.num_train)
    dev = load_split(cfg, cfg.base.dev_split, cfg.base.num_dev)

    spm_path = base_dir / "tokenizer.model"
    if not spm_path.exists():
        texts = [format_prompt(p, cfg.data.prompt_format) + format_solution(p.solution, p.task, p.answer)
                 for p in d0]
        train_sentencepiece(texts, spm_path, vocab_size=cfg.base.tokenizer_vocab_size)
    tokenizer = Tokenizer.from_sentencepiece(spm_path)

    model_cfg = model_config_from(cfg, tokenizer)
    model = create_model(model_cfg, mesh=mesh, seed=cfg.seed)
    train_cfg = TrainConfig.from_config(cfg.base.train)
    trainer = Trainer(model, make_sft_loss(), train_cfg, mesh=mesh, workdir=str(base_dir / "train"))
    fit = trainer.fit(sft_examples(d0, tokenizer, cfg.data.prompt_format),
                      sft_examples(dev, tokenizer, cfg.data.prompt_format))

    save_hf_checkpoint(model, model_cfg, policy_dir, tokenizer=tokenizer)
    record = {
        "policy": str(policy_dir),
        "param_count": model_cfg.param_count(),
        "train_examples": len(d0),
        "steps": fit.step,
        "best_dev_loss": fit.best_dev_loss,
        "stopped_early": fit.stopped_early,
        "wall_seconds": time.time() - start,
    }
    atomic_write_json(base_dir / "base_policy.json", record)
    (policy_dir / DONE).write_text("ok\n")
    return record


def evaluate_base_policy(cfg, workdir, *, mesh=None) -> dict:
    """The base policy on the eval split with `base.eval_methods`, through the evaluation harness."""
    from alphallm_jax import load_pretrained
    from alphallm_jax.pipeline.evaluation import eval_context, evaluate_methods

    model, tokenizer = load_pretrained(as_path(workdir) / "base" / "policy", dtype=cfg.model.dtype, mesh=mesh)
    problems, ctx = eval_context(cfg, model, tokenizer, mesh=mesh)
    return evaluate_methods(problems, ctx, list(cfg.base.eval_methods), as_path(workdir) / "base",
                            batch_size=cfg.eval.batch_size)
