"""Tree search as evaluation methods: `mcts` / `mcts@k` (eta-MCTS, k = num_simulations), `mcts_lean` /
`mcts_lean@k` (the same search without fast rollouts: nodes are evaluated by v and PRM alone, beta_orm = 0,
and the answer is the ORM vote over its terminals; with `critics.tools.steps` the calculator still scores
every state) and `beam` / `beam@k` (step-level beam search guided by the PRM or value, k = beam width).

Each method searches a batch of problems in lockstep through one `LMSearchBackend` and reports the
chosen path's solution, every generated token (options, rejected near-duplicates, rollouts) and the
tree's nodes (options kept in the tree) per question. What they use from `EvalContext.components`:
  "critic": a `CriticScorer` (required);
  "search": `SearchSettings` (default: the paper's GSM8K small-budget preset and default options);
  "search_sampler": the policy sampler for the trees (default: the context's sampler; a dedicated one
      with a larger KV pool avoids evicting tree states);
  "rollout_sampler": the fast-rollout policy's sampler (default: the policy rolls out);
  "search_backend": built from the above on first use and shared by the methods.
`eval_components` builds them from a config for `alphallm eval`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from alphallm_jax.search.lm_backend import LMSearchBackend

SEARCH_METHODS = ("mcts", "mcts_lean", "beam")
CRITIC_METHODS = ("orm", "prm", *SEARCH_METHODS)


@dataclasses.dataclass
class TreeSearchMethod:
    method: str  # mcts | mcts_lean | beam
    k: int | None = None
    spec: str = ""

    def run(self, problems, ctx):
        from alphallm_jax.pipeline.eval_methods import MethodOutput
        from alphallm_jax.pipeline.search_run import SearchSettings, chosen_solution, search_problem
        from alphallm_jax.search.baselines import beam_search
        from alphallm_jax.search.mcts import run_mcts

        settings = ctx.components.get("search") or SearchSettings()
        backend = search_backend(ctx, settings)
        searched = [search_problem(p, ctx.prompt_for(p), ctx.seed) for p in problems]
        if self.method in ("mcts", "mcts_lean"):
            config = settings.mcts
            if self.method == "mcts_lean":
                config = config.replace(num_rollouts=0, beta_orm=0.0, answer_selection="orm_vote")
            if self.k:
                config = config.replace(num_simulations=self.k, min_terminals=min(config.min_terminals, self.k))
            trees = run_mcts(searched, backend, config)
        else:
            config = settings.beam if not self.k else dataclasses.replace(settings.beam, beam_width=self.k)
            trees = beam_search(searched, backend, config)
        return [MethodOutput(
            chosen_solution(t), int(t.generated_tokens), len(t) - 1,
            {"answer_method": t.answer_method, "simulations": t.simulations, "terminals": len(t.terminals()),
             "answer": t.answer}) for t in trees]


def search_backend(ctx, settings) -> LMSearchBackend:
    """The context's shared backend, built on first use (see the module doc)."""
    backend = ctx.components.get("search_backend")
    if backend is None:
        scorer = ctx.components.get("critic")
        if scorer is None:
            raise ValueError("tree search needs the critics: set critics.checkpoint for `alphallm eval`, or put a "
                             "CriticScorer in EvalContext.components['critic']")
        backend = LMSearchBackend(ctx.components.get("search_sampler") or ctx.sampler, scorer, task=ctx.task,
                                  options=settings.options, rollout_sampler=ctx.components.get("rollout_sampler"))
        ctx.components["search_backend"] = backend
    return backend


def make_search_method(method: str, k: int | None) -> TreeSearchMethod:
    if method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {method!r}; known: {SEARCH_METHODS}")
    return TreeSearchMethod(method=method, k=k, spec=f"{method}@{k}" if k else method)


def eval_components(cfg, workdir, methods: Sequence[str], model, tokenizer, prompts: Sequence[str], *,
                    mesh=None, scorer=None) -> dict[str, Any]:
    """What `methods` need beyond the sampler: a shared sample cache, the critic for orm@k/prm@k/mcts/beam
    (`scorer`, else loaded from `workdir`), and for the search methods the config's settings and a search
    backend with its own sampler (`search.pool_slots`) and the fast-rollout policy."""
    from alphallm_jax.pipeline.eval_methods import method_specs
    from alphallm_jax.pipeline.search_run import SearchSettings, load_critic_scorer, make_backend

    methods = method_specs(methods)
    names = {spec.partition("@")[0] for spec in methods}
    components: dict[str, Any] = {"sample_cache": {}}  # maj@k, orm@k, prm@k, pass@k share their samples
    if names & set(CRITIC_METHODS):
        components["critic"] = scorer if scorer is not None else load_critic_scorer(cfg, workdir, tokenizer,
                                                                                    mesh=mesh)
    if names & set(SEARCH_METHODS):
        settings = SearchSettings.from_config(cfg)
        components["search"] = settings
        components["search_backend"] = make_backend(cfg, workdir, model, tokenizer, prompts,
                                                    scorer=components["critic"], mesh=mesh, settings=settings,
                                                    methods=methods)
    return components
