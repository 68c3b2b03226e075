"""XLA flags for training on CPU, applied before JAX starts its backend.

Measured on the ~30M `bench_30m` SFT step (batch 8 x 256, 2 cores, jax 0.10.2): letting XLA:CPU's
YNNPACK library fuse dots with their neighbouring elementwise ops and reductions
(``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``) cut the forward+backward time by about 10-15%
(fewer transposed copies feeding the weight-gradient dots) and left the gradients bitwise unchanged.
The flag is experimental XLA surface: `apply_xla_flags` never overrides a value the user already put
in ``XLA_FLAGS``.

``CPU_FAST_MATH_FLAGS`` adds XLA:CPU fast math (approximate exp/division/rsqrt, reassociation) while
still honouring NaN and Inf, so the trainer's non-finite check keeps working. On the same step it
saved a further ~7-10%, but gradients move by up to ~1e-3 of their largest magnitude, so it is opt-in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

CPU_TRAINING_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
CPU_FAST_MATH_FLAGS: tuple[str, ...] = CPU_TRAINING_FLAGS + (
    "--xla_cpu_enable_fast_math=true", "--xla_cpu_fast_math_honor_nans=true",
    "--xla_cpu_fast_math_honor_infs=true")
FLAG_SETS: dict[str, tuple[str, ...]] = {"none": (), "recommended": CPU_TRAINING_FLAGS,
                                         "fast_math": CPU_FAST_MATH_FLAGS}


def define_flag_set_flag() -> None:
    """`--xla_cpu_flags={none,recommended,fast_math}` for the benchmarks, which pick their flag set
    (the other commands always apply the recommended one)."""
    from absl import flags

    flags.DEFINE_enum("xla_cpu_flags", "recommended", list(FLAG_SETS),
                      "XLA:CPU flag set applied before JAX starts (alphallm_jax.train.xla_flags).")


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def apply_xla_flags(flags: Sequence[str] = CPU_TRAINING_FLAGS) -> list[str]:
    """Appends ``flags`` to ``XLA_FLAGS`` (a flag whose name is already there is kept as the user set
    it). Returns the flags added; none when the JAX backend has already started (too late: XLA reads
    its flags once), which is logged."""
    if _backend_started():
        log.warning("JAX backend already started; XLA flags %s not applied", list(flags))
        return []
    current = os.environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in current.split()}
    added = [f for f in flags if f.split("=", 1)[0] not in present]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
