"""Evaluation methods, pluggable by name: `greedy`, `maj@k`, `pass@k` (oracle coverage); `orm@k` and
`prm@k` (best-of-k by a critic) live in `critics.rerank`; `mcts` and `beam` (tree search) in
`pipeline.search_methods`.

A method turns a batch of problems into one `MethodOutput` per problem; the harness grades, writes
and summarises. A spec string is `name` or `name@k` (k: the method's budget, e.g. samples).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from alphallm_jax.data.grading import extract_answer, vote_keys
from alphallm_jax.data.problems import Problem
from alphallm_jax.sampling.stop_rules import strip_stop
from alphallm_jax.search.tree import problem_seed


@dataclasses.dataclass
class MethodOutput:
    prediction: str  # the chosen solution text
    generated_tokens: int  # every token the method sampled for this problem
    nodes: int  # reasoning steps generated (options), the papers' compute unit
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalContext:
    """What a method may use: the sampler, prompt building, generation settings, shared components."""

    sampler: Any
    task: str
    prompt_for: Callable[[Problem], str]
    eval_cfg: Any  # the config's `eval` section
    seed: int = 0
    components: dict = dataclasses.field(default_factory=dict)  # critics, search, ... (later stages)


class EvalMethod(Protocol):
    spec: str

    def run(self, problems: Sequence[Problem], ctx: EvalContext) -> list[MethodOutput]: ...


METHODS: dict[str, Callable[[int | None], EvalMethod]] = {}


def register_method(name: str):
    """Register a factory `factory(k) -> EvalMethod` under `name` (used as `name` or `name@k`)."""

    def wrap(factory):
        if name in METHODS:
            raise ValueError(f"evaluation method {name!r} registered twice")
        METHODS[name] = factory
        return factory

    return wrap


def method_specs(entries) -> list[str]:
    """Method specs from a config's list: `--config.eval.methods=greedy,maj@16` arrives as one string,
    so commas separate methods too."""
    return [m.strip() for entry in entries for m in str(entry).split(",") if m.strip()]


# Methods that read k samples of each problem through `_sample` (at the evaluation's temperature).
SAMPLED_METHODS = ("maj", "pass", "orm", "prm")


def sample_budget(specs) -> int:
    """The largest k of the sampled methods among `specs` (0: none): what `_sample` draws at once."""
    budgets = [int(k) for name, _, k in (s.partition("@") for s in method_specs(specs))
               if name in SAMPLED_METHODS and k.isdigit()]
    return max(budgets, default=0)


def make_method(spec: str) -> EvalMethod:
    name, _, budget = spec.partition("@")
    if name not in METHODS:
        raise ValueError(f"unknown evaluation method {spec!r}; known: {sorted(METHODS)} (as name or name@k)")
    if budget and not budget.isdigit():
        raise ValueError(f"evaluation method {spec!r}: the budget after '@' must be a positive integer")
    return METHODS[name](int(budget) if budget else None)


def count_steps(text: str) -> int:
    """Reasoning steps in a solution: its non-empty lines."""
    return sum(1 for line in text.split("\n") if line.strip())


def _sample(problems, ctx: EvalContext, *, num_samples: int, temperature: float):
    # Sample j of a problem has its own seed whatever the budget, so a budget of k sees the first k samples
    # of any larger one (nested budgets, as the papers' accuracy-against-budget curves assume). With a dict
    # under components["sample_cache"], methods at the same temperature sample each problem only once.
    # The evaluation's largest budget (components["sample_budget"]) is drawn at once: whichever method comes
    # first, or which of them a resumed run still has to do, every method reads the same draw, so their
    # floats (log-probabilities, critic scores) never depend on the order or on a resume.
    cache = ctx.components.get("sample_cache")
    budget = ctx.components.get("sample_budget", 0) if cache is not None and temperature > 0 else 0
    draw = max(num_samples, budget)  # greedy (temperature 0) draws its one sample alone
    key = (tuple(p.id for p in problems), draw, temperature, ctx.seed)
    if cache is not None:
        larger = [k for k in cache if k[0] == key[0] and k[2:] == key[2:] and k[1] >= num_samples]
        if larger:
            return [samples[:num_samples] for samples in cache[min(larger, key=lambda k: k[1])]]
    cfg = ctx.eval_cfg
    out = ctx.sampler.generate(
        [ctx.prompt_for(p) for p in problems], max_new_tokens=cfg.max_new_tokens, temperature=temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, stop=list(cfg.stop), num_samples=draw, seed=ctx.seed,
        prompt_seeds=[problem_seed(ctx.seed, p.id) for p in problems])  # independent of batch and process
    if cache is not None:
        cache[key] = out
    return [samples[:num_samples] for samples in out]


@dataclasses.dataclass
class Greedy:
    spec: str = "greedy"

    def run(self, problems, ctx):
        outs = []
        for (c,) in _sample(problems, ctx, num_samples=1, temperature=0.0):
            text = strip_stop(c.text, ctx.eval_cfg.stop)
            outs.append(MethodOutput(text, len(c.token_ids), count_steps(text), {"finish_reason": c.finish_reason}))
        return outs


@dataclasses.dataclass
class MajorityVote:
    """Self-consistency: k samples, the most frequent final answer (ties: higher summed log-prob)."""

    k: int
    spec: str = ""

    def run(self, problems, ctx):
        outs = []
        for samples in _sample(problems, ctx, num_samples=self.k, temperature=ctx.eval_cfg.temperature):
            texts = [strip_stop(c.text, ctx.eval_cfg.stop) for c in samples]
            keys = vote_keys([extract_answer(t, ctx.task) for t in texts], ctx.task)
            votes = collections.Counter(k for k in keys if k is not None)
            best = 0
            if votes:
                score = {k: (n, max(s.sum_logprob for s, kk in zip(samples, keys) if kk == k)) for k, n in votes.items()}
                winner = max(score, key=score.get)
                best = keys.index(winner)
            outs.append(MethodOutput(
                texts[best], sum(len(c.token_ids) for c in samples), sum(count_steps(t) for t in texts),
                {"votes": dict(votes.most_common(5))}))
        return outs


@dataclasses.dataclass
class PassAtK:
    """Oracle coverage: correct when any of k samples is (the prediction is the first correct one).
    It reads the reference answer, so it measures what search could find, never a deployable method."""

    k: int
    spec: str = ""

    def run(self, problems, ctx):
        from alphallm_jax.data.grading import is_correct

        outs = []
        for problem, samples in zip(problems, _sample(problems, ctx, num_samples=self.k,
                                                      temperature=ctx.eval_cfg.temperature)):
            texts = [strip_stop(c.text, ctx.eval_cfg.stop) for c in samples]
            hits = [i for i, t in enumerate(texts) if is_correct(t, problem.answer, ctx.task)]
            outs.append(MethodOutput(
                texts[hits[0] if hits else 0], sum(len(c.token_ids) for c in samples),
                sum(count_steps(t) for t in texts), {"num_correct": len(hits)}))
        return outs


@register_method("greedy")
def _greedy(k: int | None) -> EvalMethod:
    if k not in (None, 1):
        raise ValueError("greedy takes no budget (use maj@k for several samples)")
    return Greedy()


@register_method("maj")
def _majority(k: int | None) -> EvalMethod:
    if not k:
        raise ValueError("maj needs a budget: maj@k")
    return MajorityVote(k=k, spec=f"maj@{k}")


@register_method("pass")
def _pass_at_k(k: int | None) -> EvalMethod:
    if not k:
        raise ValueError("pass needs a budget: pass@k")
    return PassAtK(k=k, spec=f"pass@{k}")


@register_method("orm")
def _orm_rerank(k: int | None) -> EvalMethod:
    """Best-of-k by the (tool-augmented) ORM; needs components["critic"]."""
    from alphallm_jax.critics.rerank import make_rerank

    return make_rerank("orm", k)


@register_method("prm")
def _prm_rerank(k: int | None) -> EvalMethod:
    """Best-of-k by the PRM aggregated over steps; needs components["critic"]."""
    from alphallm_jax.critics.rerank import make_rerank

    return make_rerank("prm", k)


@register_method("mcts")
def _mcts(k: int | None) -> EvalMethod:
    """eta-MCTS with the critics (k: num_simulations); see `pipeline.search_methods`."""
    from alphallm_jax.pipeline.search_methods import make_search_method

    return make_search_method("mcts", k)


@register_method("mcts_lean")
def _mcts_lean(k: int | None) -> EvalMethod:
    """eta-MCTS without fast rollouts (v + PRM only, ORM vote over terminals); see `pipeline.search_methods`."""
    from alphallm_jax.pipeline.search_methods import make_search_method

    return make_search_method("mcts_lean", k)


@register_method("beam")
def _beam(k: int | None) -> EvalMethod:
    """Step-level beam search guided by the PRM or value (k: beam width); see `pipeline.search_methods`."""
    from alphallm_jax.pipeline.search_methods import make_search_method

    return make_search_method("beam", k)
