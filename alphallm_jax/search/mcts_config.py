"""`MCTSConfig`: every eta-MCTS hyperparameter of ALGORITHMS.md section 3, with the paper presets.

Build one from a preset (`MCTSConfig.gsm8k_small()`), from a dict or an ml-collections `ConfigDict`
(`MCTSConfig.from_config(cfg)`, unknown keys are an error; an optional `preset` key names the base the
other keys override), or directly. The config is frozen: a search never changes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SELECTIONS = ("uct", "puct")
UCT_FORMS = ("paper", "code")  # paper: sqrt(2 ln N / n); the authors' code: sqrt(ln N / n)
MERGE_DISTANCES = ("edit", "cosine", "none")  # none: state merging off (the ablation without it)
TERMINAL_REWARDS = ("orm", "orm_scaled")
ANSWER_SELECTIONS = ("greedy_q", "best_terminal", "orm_vote", "orm_vote_rollouts")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """eta-MCTS hyperparameters. Defaults are the GSM8K small-budget preset."""

    # Selection: UCT `Q + c * sqrt(2 ln N_parent / N)` (paper form; "code" drops the 2) or PUCT
    # `Q + c * P * sqrt(N_parent) / (1 + N)` with P from length-normalised option log-probabilities.
    selection: str = "uct"
    c_uct: float = 1.0  # the exploration constant c of UCT and PUCT
    uct_form: str = "paper"

    # Importance-weighted expansion: n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t))).
    # alpha = 0 gives fixed-width search with c_min(t) children (the value-only ablation).
    alpha: float = 1.0
    c_max0: int = 60  # c_max at the root (depth 0)
    c_max: int = 10  # c_max at depth > 0
    c_min0: int = 10  # c_min at the root
    c_min: int = 2  # c_min at depth > 0

    # State merging: a new option closer than merge_threshold to a sibling is resampled, at most
    # max_resample times; then the sample farthest from its siblings is kept.
    merge_distance: str = "edit"  # edit: characters (duplicate when < threshold); cosine: duplicate
    merge_threshold: float = 20.0  # when the embeddings' cosine similarity >= threshold (paper: 0.7)
    max_resample: int = 5

    # Evaluation r(s) = beta_v * v(s) + beta_prm * PRM(s) + beta_orm * mean ORM(num_rollouts rollouts).
    beta_v: float = 1.0
    beta_prm: float = 1.0
    beta_orm: float = 1.0
    num_rollouts: int = 4
    # A terminal node is scored by the ORM directly ("orm", the paper); "orm_scaled" multiplies it by
    # beta_v + beta_prm + beta_orm so terminal and interior rewards share one scale.
    terminal_reward: str = "orm"

    # Budget: at least num_simulations iterations and at least min_terminals terminal nodes, stopping at
    # hard_cap_factor * num_simulations iterations whatever the terminal count.
    num_simulations: int = 40
    min_terminals: int = 40
    hard_cap_factor: int = 10
    max_depth: int = 10  # a node at this depth is terminal; the option leading to it is rolled out to the end

    # Answer: the highest-Q path (completed to the end if needed), the best terminal by critic score,
    # or the ORM-weighted vote over terminal answers (orm_vote_rollouts: over the fast rollouts' answers too).
    answer_selection: str = "greedy_q"

    # Lockstep batching: each active tree sends up to leaves_per_tree_per_round expansions per round,
    # spread by virtual loss (each in-flight selection counts as a visit with reward -virtual_loss).
    virtual_loss: float = 1.0
    leaves_per_tree_per_round: int = 4
    max_active_trees: int = 0  # trees searched at once; 0: every problem of the call

    def __post_init__(self) -> None:
        choices = {
            "selection": SELECTIONS, "uct_form": UCT_FORMS, "merge_distance": MERGE_DISTANCES,
            "terminal_reward": TERMINAL_REWARDS, "answer_selection": ANSWER_SELECTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MCTSConfig.{name}={getattr(self, name)!r}; choose from {allowed}")
        for name in ("c_uct", "alpha", "beta_v", "beta_prm", "beta_orm", "virtual_loss", "merge_threshold"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"MCTSConfig.{name}={value!r} must be a finite number >= 0")
        if self.c_max0 < 1 or self.c_max < 1:
            raise ValueError("c_max0 and c_max must be >= 1 (a node needs room for one child)")
        if self.c_min0 < 0 or self.c_min < 0:
            raise ValueError("c_min0 and c_min must be >= 0")
        minimums = {"max_depth": 1, "num_simulations": 1, "hard_cap_factor": 1, "leaves_per_tree_per_round": 1}
        for name, low in minimums.items():
            if getattr(self, name) < low:
                raise ValueError(f"MCTSConfig.{name} must be >= {low}")
        for name in ("min_terminals", "max_resample", "num_rollouts", "max_active_trees"):
            if getattr(self, name) < 0:
                raise ValueError(f"MCTSConfig.{name} must be >= 0")
        if self.beta_orm > 0 and self.num_rollouts == 0:
            raise ValueError("beta_orm > 0 needs num_rollouts >= 1 (the ORM term averages over fast rollouts)")
        if self.merge_distance == "cosine" and self.merge_threshold > 1:
            raise ValueError("merge_distance='cosine' takes a similarity threshold in [0, 1]")

    # Derived quantities the driver reads.
    def c_min_at(self, depth: int) -> int:
        return self.c_min0 if depth == 0 else self.c_min

    def c_max_at(self, depth: int) -> int:
        return self.c_max0 if depth == 0 else self.c_max

    @property
    def widens(self) -> bool:
        """Can importance-weighted expansion give a node more than c_min(t) children? I(s) is a
        difference of two value-head probabilities, at most 1, so floor(alpha * I(s)) + 1 never passes
        floor(alpha) + 1: with the paper's alpha = 1 every node keeps c_min(t) children."""
        most = math.floor(self.alpha + 1e-9) + 1
        return self.alpha > 0 and any(min(most, self.c_max_at(d)) > self.c_min_at(d) for d in (0, 1))

    @property
    def max_simulations(self) -> int:
        return self.hard_cap_factor * self.num_simulations

    @property
    def needs_value(self) -> bool:
        """The value head is read when it enters r(s) or drives importance-weighted branching."""
        return self.beta_v > 0 or self.alpha > 0

    @property
    def rollouts_per_node(self) -> int:
        return self.num_rollouts if self.beta_orm > 0 else 0

    @property
    def merging(self) -> bool:
        return self.merge_distance != "none"

    def replace(self, **changes: Any) -> MCTSConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> MCTSConfig:
        """From a dict or an ml-collections ``ConfigDict`` (unknown keys are an error).

        A ``preset`` key (a name in ``PRESETS``) picks the base that the other keys override.
        """
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        preset = d.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MCTSConfig fields: {sorted(unknown)}")
        base = cls.preset(preset) if preset else cls()
        return dataclasses.replace(base, **d)

    @classmethod
    def preset(cls, name: str) -> MCTSConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown MCTS preset {name!r}; known: {sorted(PRESETS)}")
        return getattr(cls, name)()

    # The paper presets (AlphaLLM section 4 and the authors' search script).
    @classmethod
    def gsm8k_small(cls) -> MCTSConfig:
        return cls(c_uct=1.0, c_min0=10, c_min=2, c_max0=60, c_max=10)

    @classmethod
    def gsm8k_large(cls) -> MCTSConfig:
        return cls(c_uct=1.5, c_min0=40, c_min=2, c_max0=60, c_max=10)

    @classmethod
    def math_small(cls) -> MCTSConfig:
        return cls(c_uct=1.0, c_min0=10, c_min=3, c_max0=60, c_max=10)

    @classmethod
    def math_large(cls) -> MCTSConfig:
        return cls(c_uct=1.0, c_min0=20, c_min=3, c_max0=60, c_max=10)

    @classmethod
    def math(cls) -> MCTSConfig:
        """MATH: the larger root width (c_min(0) = 20) of the paper's two MATH settings."""
        return cls.math_large()


PRESETS = ("gsm8k_small", "gsm8k_large", "math_small", "math_large", "math")
