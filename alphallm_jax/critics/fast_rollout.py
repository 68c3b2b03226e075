"""The fast-rollout policy: a second, smaller policy used only for the search's rollouts to the end.

In the paper a 7B model rolls out for a 70B policy. In the demo it is a smaller tiny Llama trained
exactly like the base policy (`pipeline.base_policy.train_base_policy` with the `rollout_policy`
model and train sections) on the base policy's tokenizer: rollouts continue the policy's own token
states, so both must share one vocabulary.
"""

from __future__ import annotations

from alphallm_jax.models.tokenizer import SP_FILE
from alphallm_jax.utils.io import as_path

SUBDIR = "fast_rollout"


def fast_policy_dir(cfg, workdir):
    """The configured fast policy, else WORKDIR/fast_rollout/policy."""
    return as_path(cfg.rollout_policy.checkpoint) if cfg.rollout_policy.checkpoint else (
        as_path(workdir) / SUBDIR / "policy")


def train_fast_rollout_policy(cfg, workdir, policy_dir, *, mesh=None) -> dict:
    """Trains (or resumes, or skips) the fast policy under WORKDIR/fast_rollout on `policy_dir`'s tokenizer."""
    from alphallm_jax.pipeline.base_policy import train_base_policy

    if cfg.rollout_policy.checkpoint:
        return {"policy": cfg.rollout_policy.checkpoint, "skipped": True}
    tokenizer_path = as_path(policy_dir) / SP_FILE
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path} not found: the fast-rollout policy reuses the policy's "
                                "sentencepiece tokenizer (set rollout_policy.checkpoint for other tokenizers)")
    return train_base_policy(cfg, workdir, mesh=mesh, subdir=SUBDIR, model_section=cfg.rollout_policy.model,
                             train_section=cfg.rollout_policy.train, tokenizer_path=tokenizer_path)


def load_fast_rollout_policy(cfg, workdir, *, mesh=None):
    """(model, tokenizer) of the fast policy, for the search's rollout sampler."""
    from alphallm_jax.models.loading import load_policy

    return load_policy(cfg, fast_policy_dir(cfg, workdir), mesh=mesh)
