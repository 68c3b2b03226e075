"""The eta-MCTS component ablation in the paper's order (AlphaLLM, GSM8K, cumulative):

    value-only, fixed width           79.5
    + importance-weighted expansion   84.9
    + PRM                             85.9
    + fast-rollout ORM                86.5
    + state merging                   87.0

Each rung is the configured `search.mcts` with the components of the later rungs switched off:
fixed width is `alpha = 0` (c_min(t) children), no PRM is `beta_prm = 0`, no fast-rollout ORM is
`beta_orm = 0` with no rollouts, no merging is `merge_distance = "none"`. The configured search is the
last rung, or the fourth when it runs without merging (see `rung_overrides`). The loop runs every rung as
the `mcts` evaluation method on the same problems.
"""

from __future__ import annotations

import dataclasses

from alphallm_jax.search.mcts_config import MCTSConfig


@dataclasses.dataclass(frozen=True)
class AblationRung:
    name: str  # stage directory name
    label: str  # as in the paper's table
    paper_gsm8k: float  # the paper's accuracy for the rung (Llama-2-70B, GSM8K)


RUNGS = (
    AblationRung("value_only_fixed_width", "value-only, fixed width", 79.5),
    AblationRung("adaptive_branching", "+ importance-weighted expansion", 84.9),
    AblationRung("prm", "+ PRM", 85.9),
    AblationRung("fast_rollout_orm", "+ fast-rollout ORM", 86.5),
    AblationRung("state_merging", "+ state merging", 87.0),
)


def rung_overrides(full: MCTSConfig) -> list[tuple[AblationRung, dict]]:
    """(rung, the MCTSConfig fields it changes from `full`) for every rung, in order.

    The first four rungs switch off what comes later; the last adds state merging to the fourth. When the
    configured search merges, the last rung is that search; when it does not (`merge_distance="none"`), the
    last rung merges by character edit distance under the configured `merge_threshold`, so the table
    still measures the component."""
    off = {"alpha": 0.0, "beta_prm": 0.0, "beta_orm": 0.0, "num_rollouts": 0, "merge_distance": "none"}
    restored_by_rung = [(), ("alpha",), ("beta_prm",), ("beta_orm", "num_rollouts")]
    changes, out = dict(off), []
    for rung, restored in zip(RUNGS, restored_by_rung):
        for field in restored:
            del changes[field]
        out.append((rung, {k: v for k, v in changes.items() if getattr(full, k) != v}))
    merging = {} if full.merging else {"merge_distance": "edit"}
    out.append((RUNGS[-1], merging))
    return out
