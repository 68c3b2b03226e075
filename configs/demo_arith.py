"""The built-in demo: the arith reference task with a tiny Llama-architecture model on CPU.

`--config=configs/demo_arith.py` runs the full-size demo; `--config=configs/demo_arith.py:quick`
runs the same stages small (CI-sized).
"""

from alphallm_jax.config import default_config


def get_config(variant: str | None = None):
    c = default_config()
    c.task = "arith"
    c.data.prompt_format = "plain"
    c.sampling.max_len = 256
    c.sampling.pool_slots = 512
    c.sampling.max_batch = 128
    c.eval.split = "arith:test"
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 160
    c.eval.temperature = 1.0
    c.eval.stop = ("\n\n", "\nQuestion:")
    c.eval.batch_size = 64
    if variant == "quick":
        c.eval.limit = 40
        c.eval.methods = ("greedy", "maj@4")
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of demo_arith.py; known: quick")
    return c
