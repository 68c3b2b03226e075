"""Batched, jitted option sampling with KV forking for tree search."""

from alphallm_jax.sampling.kv_pool import SeqState
from alphallm_jax.sampling.sampler import Completion, Sampler, SampleRequest, SamplerStats, sampler_from_config

__all__ = ["Completion", "SampleRequest", "Sampler", "SamplerStats", "SeqState", "sampler_from_config"]
