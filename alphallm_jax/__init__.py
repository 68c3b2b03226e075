"""alphallm_jax: AlphaLLM (imagination, eta-MCTS, three critics, SFT) and AlphaLLM-CPL in JAX."""

__version__ = "0.1.0"


def load_pretrained(path, dtype: str = "float32", **kwargs):
    """`model, tokenizer = load_pretrained(path)` for a Hugging Face or orbax checkpoint directory."""
    from alphallm_jax.models.loading import load_pretrained as _load

    return _load(path, dtype=dtype, **kwargs)


__all__ = ["load_pretrained", "__version__"]
