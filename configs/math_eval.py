"""Few-shot evaluation on MATH500 (the papers' MATH split); set --config.model.checkpoint."""

from alphallm_jax.config import default_config


def get_config(variant: str | None = None):
    c = default_config()
    c.task = "math"
    c.data.prompt_format = "fewshot"
    c.data.num_exemplars = 4
    c.eval.split = "math:math500"
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 1024
    c.eval.temperature = 0.7
    c.eval.stop = ("\nProblem:", "\nQuestion:")
    c.sampling.max_len = 4096
    if variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of math_eval.py")
    return c
