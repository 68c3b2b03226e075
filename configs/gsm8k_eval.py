"""Few-shot evaluation on GSM8K test (set --config.model.checkpoint to an HF or orbax directory)."""

from alphallm_jax.config import default_config


def get_config(variant: str | None = None):
    c = default_config()
    c.task = "gsm8k"
    c.data.prompt_format = "fewshot"
    c.data.num_exemplars = 4
    c.eval.split = "gsm8k:test"
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 320
    c.eval.temperature = 0.7
    c.eval.stop = ("\n\n", "\nQuestion:")
    c.sampling.max_len = 2048
    if variant == "small":
        c.eval.limit = 20
        c.eval.methods = ("greedy", "maj@4")
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of gsm8k_eval.py; known: small")
    return c
