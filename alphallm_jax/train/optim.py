"""Optimizer pieces of the trainer: learning-rate schedules, AdamW with clipping and a decay mask.

The learning rate at optimizer step ``s`` (0-based: ``s`` updates applied before this one) is

* warm-up (``s < warmup_steps``): ``peak * (s + 1) / warmup_steps``, so the first update already
  moves the parameters (``peak / warmup_steps``) and the last warm-up update uses ``peak``;
* then, with ``p = (s - warmup_steps) / max(1, total_steps - warmup_steps - 1)`` clipped to [0, 1]:
  ``cosine``: ``end + (peak - end) * (1 + cos(pi * p)) / 2``; ``linear``: ``peak + (end - peak) * p``;
  ``constant``: ``peak``. The last of ``total_steps`` updates uses ``end`` exactly when at least two
  updates follow the warm-up (a single one runs at ``peak``, as the first decay step always does).

The paper's SFT preset is 5e-6 decaying to 1e-6 with 10% warm-up.

Gradient accumulation is not an optax wrapper here: the trainer's jitted step loops over
microbatches itself (``train.step``), so every optimizer state (and every checkpoint) sits on a
full-step boundary and a resumed run replays exactly the same updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("cosine", "linear", "constant")

# Path components (lower-cased substrings) of parameters that never get weight decay.
NO_DECAY_NAME_PARTS = ("norm", "scale", "bias")


def warmup_steps_for(total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> int:
    """Number of warm-up steps: ``warmup_steps`` when given, else ``ceil(ratio * total_steps)``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps is None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return min(int(warmup_steps), total_steps)


def make_schedule(peak_lr: float, total_steps: int, *, end_lr: float | None = None,
                  warmup_ratio: float = 0.0, warmup_steps: int | None = None,
                  kind: str = "cosine") -> optax.Schedule:
    """Warm-up then ``kind`` decay from ``peak_lr`` to ``end_lr`` over ``total_steps`` updates.

    ``end_lr`` defaults to ``peak_lr`` (no decay). Returns a function of the 0-based update count
    giving a float32 learning rate: a NumPy value for a host number or NumPy array (how the trainer
    feeds its compiled step, so that one program serves every schedule), a JAX array for a traced one.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose from {SCHEDULES}")
    end_lr = peak_lr if end_lr is None else end_lr
    warm = warmup_steps_for(total_steps, warmup_ratio, warmup_steps)
    decay_len = max(1, total_steps - warm - 1)

    def schedule(count):
        xp = np if isinstance(count, (int, float, np.ndarray, np.generic)) else jnp
        s = xp.asarray(count, xp.float32)
        warm_lr = peak_lr * (s + 1.0) / max(warm, 1)
        p = xp.clip((s - warm) / decay_len, 0.0, 1.0)
        if kind == "cosine":
            decayed = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + xp.cos(xp.pi * p))
        elif kind == "linear":
            decayed = peak_lr + (end_lr - peak_lr) * p
        else:
            decayed = xp.full_like(p, peak_lr)
        return xp.where(s < warm, warm_lr, decayed).astype(xp.float32)

    return schedule


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return names


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: rank >= 2 and not a norm scale or bias (a name holding
    "norm", "scale" or "bias", or starting with "b_": the critic head's per-critic `b_in_cm` is rank 2).

    Works on any pytree (an ``nnx.State`` of Params included); returns a tree of bools of the same
    structure, as ``optax.adamw(mask=...)`` expects.
    """

    def is_decayed(path, leaf) -> bool:
        names = [n.lower() for n in _path_names(path)]
        if any(part in n for n in names for part in NO_DECAY_NAME_PARTS):
            return False
        if any(n.startswith("b_") for n in names):  # a bias named with its shape suffix (`b_in_cm`)
            return False
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(*, learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8,
                   mask: Any | Callable[[Any], Any] | None = decay_mask) -> optax.GradientTransformation:
    """Global-norm clipping (when ``max_grad_norm`` > 0) followed by AdamW.

    Weight decay is decoupled and scaled by the learning rate (PyTorch's ``AdamW`` convention);
    ``mask`` selects the decayed parameters (default: no decay on norms, biases or vectors).
    Optimizer moments live in the parameters' dtype (float32 master weights).
    """
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=mask if weight_decay else None))
    return optax.chain(*parts)
