"""Best-of-k reranking by a critic, as evaluation methods `orm@k` and `prm@k`.

k solutions are sampled per problem exactly as `maj@k` samples them (same seeds, so the methods
compare on the same samples); all k * batch solutions are scored in one batched critic call; the
prediction is the highest-scoring one: `orm@k` by the tool-augmented ORM (`ToolConfig` decides how
the tools fold in; combine="none" gives the plain ORM), or by the outcome combiner when the critic has
one (`critics.combiner`: the ORM, the tools and the sample's mean token log-probability), `prm@k` by the
PRM aggregated over the solution's steps. Ties go to the higher summed log-probability. The critic comes from
`ctx.components["critic"]` (a `CriticScorer`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alphallm_jax.critics.combiner import mean_token_logprob
from alphallm_jax.critics.positions import strip_trailing

HEADS = ("orm", "prm")


@dataclasses.dataclass
class CriticRerank:
    k: int
    head: str  # "orm" | "prm"
    spec: str = ""

    def run(self, problems, ctx):
        from alphallm_jax.pipeline.eval_methods import MethodOutput, _sample, count_steps
        from alphallm_jax.sampling.stop_rules import strip_stop

        scorer = ctx.components.get("critic")
        if scorer is None:
            raise ValueError(f"{self.spec} needs a critic: set critics.checkpoint for `alphallm eval`, or put a "
                             "CriticScorer in EvalContext.components['critic']")
        samples = _sample(problems, ctx, num_samples=self.k, temperature=ctx.eval_cfg.temperature)
        prompt_ids, solution_ids, texts, mean_lp = [], [], [], []
        for problem, group in zip(problems, samples):
            ids = scorer.tokenizer.encode(ctx.prompt_for(problem), add_bos=True)
            for c in group:
                text = strip_stop(c.text, ctx.eval_cfg.stop)
                # Scored without the stop string's tokens, as the critic's training rows end: they would
                # add a step (`\n\n` as two newlines) and move the ORM's read to `Question:`'s end. The
                # sampler's own cut keeps the fewest tokens that still spell the text.
                solution = ctx.sampler.cut(ids, c.token_ids, len(text))[0] if len(text) < len(c.text) \
                    else list(c.token_ids)
                prompt_ids.append(ids)
                solution_ids.append(solution)
                texts.append(text)
                kept = len(strip_trailing(solution, scorer.eos_ids))  # as the critic data counts them
                mean_lp.append(mean_token_logprob(np.sum(c.logprobs[:kept]), kept))
        scores = scorer.score_solutions(prompt_ids, solution_ids, texts, mean_logprobs=mean_lp)
        if self.head == "prm":
            chosen = scores.prm
        else:
            chosen = scores.orm_tool if scores.orm_combined is None else scores.orm_combined
        outs = []
        for i, group in enumerate(samples):
            lo = i * self.k
            keys = [(float(chosen[lo + j]), c.sum_logprob) for j, c in enumerate(group)]
            best = max(range(len(group)), key=keys.__getitem__)
            group_texts = texts[lo:lo + self.k]
            outs.append(MethodOutput(
                group_texts[best], sum(len(c.token_ids) for c in group), sum(count_steps(t) for t in group_texts),
                {"score": float(chosen[lo + best]), "orm": float(scores.orm[lo + best]),
                 "tool_ok": int(np.sum(scores.tool_ok[lo:lo + self.k]))}))
        return outs


def make_rerank(head: str, k: int | None) -> CriticRerank:
    if head not in HEADS:
        raise ValueError(f"unknown rerank head {head!r}; known: {HEADS}")
    if not k:
        raise ValueError(f"{head} needs a budget: {head}@k")
    return CriticRerank(k=k, head=head, spec=f"{head}@{k}")
