"""Training: one trainer loop (SFT now; DPO and critic training plug in their losses)."""

from alphallm_jax.train.batching import BatchIterator, IteratorState, SFTExample, collate_dicts, collate_sft
from alphallm_jax.train.losses import make_sft_loss, sequence_log_probs, sft_loss
from alphallm_jax.train.optim import decay_mask, make_optimizer, make_schedule
from alphallm_jax.train.trainer import FitResult, NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "BatchIterator", "FitResult", "IteratorState", "NonFiniteLossError", "SFTExample", "TrainConfig",
    "Trainer", "collate_dicts", "collate_sft", "decay_mask", "make_optimizer", "make_schedule",
    "make_sft_loss", "sequence_log_probs", "sft_loss",
]
