"""Imagination: new unlabelled prompts written by the policy from the seed set D0, filtered for form,
near-duplicates (of D0, of each other) and overlap with the evaluation splits."""

from alphallm_jax.synthesis.run import d0_problems, previous_prompts, run_synthesis, synthesize_from_config
from alphallm_jax.synthesis.settings import DedupSettings, SynthesisSettings
from alphallm_jax.synthesis.synthesize import (
    SynthesisResult,
    load_synthesis,
    require_prompts,
    summary_line,
    synthesize,
)

__all__ = ["DedupSettings", "SynthesisResult", "SynthesisSettings", "d0_problems", "load_synthesis",
           "previous_prompts", "require_prompts", "run_synthesis", "summary_line", "synthesize",
           "synthesize_from_config"]
