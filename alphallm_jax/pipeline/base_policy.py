"""The built-in demo's base policy: a tokenizer and a tiny Llama trained from scratch on labelled D0.

Stages, each skipped when its artifact exists (a rerun resumes; the trainer resumes mid-run):
  1. `tokenizer.model`: SentencePiece trained on D0's questions and solutions (digits split).
  2. `train/`: SFT of a tiny `Decoder` (the same NNX code as the real models) on D0 with the
     shared trainer, early-stopped on the dev split.
  3. `policy/`: the trained model and tokenizer as a Hugging Face checkpoint (+ `DONE` marker).
It is deliberately small and briefly trained, so that search and self-training have room to help.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from alphallm_jax.data.arith import with_slips
from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import QUESTION_PREFIX, format_solution
from alphallm_jax.data.spm_training import SPECIAL_IDS, train_sentencepiece
from alphallm_jax.models import ModelConfig, Tokenizer, create_model
from alphallm_jax.models.hf_io import save_hf_checkpoint
from alphallm_jax.pipeline.evaluation import load_split, prompt_builder, without_exemplars
from alphallm_jax.train.batching import SFTExample, drop_overlong_splits
from alphallm_jax.train.losses import make_sft_loss
from alphallm_jax.train.trainer import TRAIN_BOOKKEEPING_KEYS, TrainConfig, Trainer
from alphallm_jax.utils.distributed import barrier, broadcast_int, is_coordinator
from alphallm_jax.utils.io import as_path, atomic_write_json, atomic_write_text
from alphallm_jax.utils.run_identity import check_run_identity

log = logging.getLogger(__name__)
DONE = "DONE"


def sft_examples(problems, tokenizer: Tokenizer, prompt_for: Callable[[Problem], str], *,
                 question_loss: bool = False) -> list[SFTExample]:
    """(prompt, reference solution + EOS) token pairs, the prompt written by `prompt_for` (the config's
    `prompt_builder`, so the policy learns the format it is evaluated with); the loss covers the solution
    only.

    With `question_loss` (plain and fewshot formats) the loss also covers the problem's own question:
    the prompt shrinks to what precedes it (`BOS Question:`, after the exemplars for fewshot) and the
    rest of the same token sequence becomes response. The tokens are unchanged, so this costs nothing,
    and the policy learns to write questions too, which imagination needs (fewshot: a question after
    D0 questions, as its fewshot method asks). Where the text before the question does not tokenize as
    a prefix of the prompt's tokens, the plain format keeps its loss on everything after BOS and the
    fewshot one on the solution only.
    """
    prefix = QUESTION_PREFIX.rstrip()
    heads: dict[str, list[int]] = {}  # the text before a question, encoded once (plain: always `Question:`)
    examples = []
    for p in problems:
        prompt = prompt_for(p)
        prompt_ids = tokenizer.encode(prompt, add_bos=True)
        # The solution encoded on its own, so it starts with SentencePiece's word-start marker ("\n", "▁He"
        # where "\n", "He" is the in-context split; `Tokenizer.encode_continuation`): the demo's base policy
        # learns that start and every later stage reads its sampled ids, so the demo is consistent. Kept so,
        # as changing it retrains every demo model.
        response = tokenizer.encode(format_solution(p.solution, p.task, p.answer)) + [tokenizer.eos_ids[0]]
        split = len(prompt_ids)
        at = prompt.rfind(prefix)
        if question_loss and at >= 0:
            head = prompt[:at + len(prefix)]
            head_ids = heads.get(head) or heads.setdefault(head, tokenizer.encode(head, add_bos=True))
            if prompt_ids[:len(head_ids)] == head_ids:
                split = len(head_ids)
            elif at == 0:
                split = 1
        examples.append(SFTExample(prompt_ids[:split], prompt_ids[split:] + response))
    return examples


def model_config_from(cfg, tokenizer: Tokenizer, model_section=None) -> ModelConfig:
    m = cfg.base.model if model_section is None else model_section
    return ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=SPECIAL_IDS["bos_id"],
        eos_token_ids=(SPECIAL_IDS["eos_id"],), pad_token_id=SPECIAL_IDS["pad_id"])


def policy_identity(cfg, model_section=None, train_section=None, tokenizer_path=None) -> dict:
    """What a trained demo policy depends on: the task, seed, data and base settings, its model and train
    sections (less bookkeeping), and the tokenizer it was handed (the fast-rollout policy's is the base's)."""
    train = (cfg.base.train if train_section is None else train_section).to_dict()
    identity = {"task": cfg.task, "seed": cfg.seed,
                "data": {k: v for k, v in cfg.data.to_dict().items() if k != "data_dir"},
                "base": {k: v for k, v in cfg.base.to_dict().items() if k not in ("model", "train", "eval_methods")},
                "model": (cfg.base.model if model_section is None else model_section).to_dict(),
                "train": {k: v for k, v in train.items() if k not in TRAIN_BOOKKEEPING_KEYS}}
    if tokenizer_path and as_path(tokenizer_path).exists():
        identity["tokenizer"] = hashlib.sha256(as_path(tokenizer_path).read_bytes()).hexdigest()
    return identity


def train_base_policy(cfg, workdir, *, mesh=None, subdir: str = "base", model_section=None, train_section=None,
                      tokenizer_path=None) -> dict:
    """Train (or resume) the demo's base policy under `workdir/subdir`; returns its record.

    The fast-rollout policy is trained by the same code: another `subdir`, model and train sections
    (default: `cfg.base.model` / `cfg.base.train`) and the base policy's tokenizer (`tokenizer_path`).
    """
    base_dir = as_path(workdir) / subdir
    policy_dir = base_dir / "policy"
    # A rerun skips (or resumes) only a policy trained with these settings: `alphallm train-base` has no
    # run config of its own to guard it, as the loop's config.json does.
    check_run_identity(base_dir, policy_identity(cfg, model_section, train_section, tokenizer_path))
    # Every process takes process 0's view of the shared workdir (training is one SPMD program).
    if broadcast_int((policy_dir / DONE).exists()):
        return {"policy": str(policy_dir), "skipped": True}
    start = time.time()
    d0 = load_split(cfg, cfg.base.train_split, cfg.base.num_train)
    if cfg.base.slip != "none":
        if cfg.task != "arith":
            raise ValueError(f"base.slip={cfg.base.slip!r} rewrites arith stories; task is {cfg.task!r} "
                             f"(set base.slip to 'none')")
        d0 = with_slips(d0, cfg.base.slip, cfg.base.slip_fraction, cfg.seed)
    dev = load_split(cfg, cfg.base.dev_split, cfg.base.num_dev)
    prompt_for = prompt_builder(cfg, tokenizer=None)
    d0, dev = without_exemplars(cfg, d0), without_exemplars(cfg, dev)

    spm_path = as_path(tokenizer_path) if tokenizer_path else base_dir / "tokenizer.model"
    if tokenizer_path and not spm_path.exists():
        raise FileNotFoundError(f"tokenizer {spm_path} not found (train the base policy first)")
    if broadcast_int(not spm_path.exists()):
        if is_coordinator():
            texts = [prompt_for(p) + format_solution(p.solution, p.task, p.answer) for p in d0]
            train_sentencepiece(texts, spm_path, vocab_size=cfg.base.tokenizer_vocab_size)
        barrier(f"{subdir}-tokenizer")
    tokenizer = Tokenizer.from_sentencepiece(spm_path)

    model_cfg = model_config_from(cfg, tokenizer, model_section)
    model = create_model(model_cfg, mesh=mesh, seed=cfg.seed)
    train_cfg = TrainConfig.from_config(cfg.base.train if train_section is None else train_section)
    trainer = Trainer(model, make_sft_loss(), train_cfg, mesh=mesh, workdir=str(base_dir / "train"))
    question_loss = bool(cfg.base.question_loss) and cfg.data.prompt_format in ("plain", "fewshot")
    train_ex, dev_ex = drop_overlong_splits(sft_examples(d0, tokenizer, prompt_for, question_loss=question_loss),
                                            sft_examples(dev, tokenizer, prompt_for, question_loss=question_loss),
                                            train_cfg.max_seq_len, f"{subdir} examples", f"{subdir}: max_seq_len")
    fit = trainer.fit(train_ex, dev_ex)

    save_hf_checkpoint(model, model_cfg, policy_dir, tokenizer=tokenizer)
    record = {
        "policy": str(policy_dir),
        "param_count": model_cfg.param_count(),
        "train_examples": len(train_ex),
        "steps": fit.step,
        "best_dev_loss": fit.best_dev_loss,
        "stopped_early": fit.stopped_early,
        "wall_seconds": time.time() - start,
    }
    if is_coordinator():
        atomic_write_json(base_dir / "base_policy.json", record)
        atomic_write_text(policy_dir / DONE, "ok\n")
    barrier(f"{subdir}-policy-saved")
    return record


def evaluate_base_policy(cfg, workdir, *, mesh=None) -> dict:
    """The base policy on the eval split with `base.eval_methods`, through the evaluation harness."""
    from alphallm_jax.pipeline.evaluation import evaluate_checkpoint

    base_dir = as_path(workdir) / "base"
    return evaluate_checkpoint(cfg, workdir, base_dir / "policy", cfg.base.eval_methods, base_dir, mesh=mesh)[0]
