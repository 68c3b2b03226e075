"""A tiny text-generating stack for tests of the LM search: an arith sentencepiece tokenizer, a random
policy whose logits are biased towards a small alphabet of arith pieces (digits, operators, newlines,
`####`, EOS) so that its samples have steps, final answers and EOS, and a random critic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphallm_jax.data.arith import generate_problems
from alphallm_jax.data.prompts import format_prompt, format_solution
from alphallm_jax.data.spm_training import SPECIAL_IDS, train_sentencepiece
from alphallm_jax.models import ModelConfig, Tokenizer
from alphallm_jax.models.critic import CriticHeadConfig, create_critic
from alphallm_jax.models.decoder import Decoder

# Piece -> logit bias; every other piece gets OTHER_BIAS (never sampled in practice).
ALPHABET_BIAS = {"\n": 2.0, "####": 0.0, "\u2581": 1.5, "+": 0.5, "=": 0.5, "*": 0.0,
                 **dict.fromkeys("0123456789", 1.0)}
EOS_BIAS = -1.5
OTHER_BIAS = -30.0


def arith_tokenizer(directory) -> Tokenizer:
    """A 384-piece sentencepiece tokenizer trained on a few hundred arith prompts and solutions."""
    problems = generate_problems(n=300, seed=7, split="tok")
    texts = [format_prompt(p, "plain") + format_solution(p.solution, p.task, p.answer) for p in problems]
    path = directory / "tokenizer.model"
    train_sentencepiece(texts, path, vocab_size=384)
    return Tokenizer.from_sentencepiece(path)


def model_config(tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=SPECIAL_IDS["bos_id"],
                       eos_token_ids=(SPECIAL_IDS["eos_id"],), pad_token_id=SPECIAL_IDS["pad_id"])


class BiasedDecoder(Decoder):
    """A decoder with a fixed logit bias per vocabulary entry (a test policy with arith-like output)."""

    def __init__(self, cfg: ModelConfig, bias_v: np.ndarray, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.logit_bias_v = nnx.Param(jnp.asarray(bias_v, jnp.float32))

    def logits_from_hidden(self, hidden_bsd: jax.Array) -> jax.Array:
        return super().logits_from_hidden(hidden_bsd) + self.logit_bias_v[...]


def logit_bias(tokenizer: Tokenizer) -> np.ndarray:
    bias = np.full(tokenizer.vocab_size, OTHER_BIAS, np.float32)
    for i in range(tokenizer.vocab_size):
        bias[i] = ALPHABET_BIAS.get(tokenizer.id_to_piece(i), OTHER_BIAS)
    bias[SPECIAL_IDS["eos_id"]] = EOS_BIAS
    return bias


def steered_policy(tokenizer: Tokenizer, *, seed: int = 0, noise: float = 0.3) -> BiasedDecoder:
    """A random policy biased towards the arith alphabet; `noise` scales the context-dependent part."""
    model = BiasedDecoder(model_config(tokenizer), logit_bias(tokenizer), rngs=nnx.Rngs(seed))
    model.lm_head_dv.set_value(model.lm_head_dv[...] * (noise / 0.02))
    return model


def random_critic(tokenizer: Tokenizer, *, seed: int = 0):
    return create_critic(model_config(tokenizer), CriticHeadConfig(hidden=32), seed=seed)
