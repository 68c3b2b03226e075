"""Batched, jitted option sampling with KV forking for tree search."""

from alphallm_jax.sampling.kv_pool import SeqState
from alphallm_jax.sampling.sampler import Completion, Sampler, SampleRequest, SamplerStats

__all__ = ["Completion", "SampleRequest", "Sampler", "SamplerStats", "SeqState"]
