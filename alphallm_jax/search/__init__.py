"""Host-side eta-MCTS: trees, selection, expansion, state merging, the lockstep driver, beam search.

Pure Python and numpy: the device work (sampling options, critics, rollouts) sits behind the
`SearchBackend` protocol (see `protocol.py`), batched across all trees of a round.
"""

from alphallm_jax.search.answers import AnswerChoice, choose_answer
from alphallm_jax.search.baselines import BeamSearchConfig, beam_search
from alphallm_jax.search.mcts import LockstepMCTS, SearchStats, run_mcts
from alphallm_jax.search.mcts_config import PRESETS, MCTSConfig
from alphallm_jax.search.merging import MergePolicy, cosine_similarity, edit_distance
from alphallm_jax.search.protocol import (
    EvaluateRequest,
    ExpandRequest,
    ExpandResult,
    NodeScores,
    RootRequest,
    SearchBackend,
)
from alphallm_jax.search.tree import Node, SearchProblem, Tree, load_tree, problem_seed, write_tree

__all__ = [
    "PRESETS", "AnswerChoice", "BeamSearchConfig", "EvaluateRequest", "ExpandRequest", "ExpandResult",
    "LockstepMCTS", "MCTSConfig", "MergePolicy", "Node", "NodeScores", "RootRequest", "SearchBackend",
    "SearchProblem", "SearchStats", "Tree", "beam_search", "choose_answer", "cosine_similarity",
    "edit_distance", "load_tree", "problem_seed", "run_mcts", "write_tree",
]
