"""`LMSearchBackend`: the search protocol (`protocol.SearchBackend`) over the policy, the critics and a
fast-rollout policy.

    backend = LMSearchBackend(sampler, scorer, task="arith", options=OptionConfig(),
                              rollout_sampler=fast_sampler)   # None: the policy rolls out
    trees = run_mcts(problems, backend, MCTSConfig.gsm8k_small())

Every protocol call is batched over all its requests:
  * `start`: the prompts' states, primed in one sampler call so that every later continuation of a root
    prefills only its last token;
  * `expand`: one `Sampler.sample` call, each request continuing its parent's cached KV state (a fork:
    the prefix is never recomputed). MATH with `math_extension`: a second call, batched too, appends a
    step to the options that have no equation;
  * `evaluate`: one scorer call for the value and PRM of every new non-terminal node, one sampler call
    for all the fast rollouts (num_rollouts per node, from the node's state), one scorer call for the
    (tool-augmented) ORM of every rollout and every terminal node;
  * `release`: the states the search no longer needs go back to the KV pool.
Handles are `LMHandle`s. `stats` counts calls and generated tokens (options + rollouts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from alphallm_jax.critics.scoring import checks_ok
from alphallm_jax.critics.tools import check_solutions, combine_with_checks
from alphallm_jax.sampling import Completion, Sampler, SampleRequest, SeqState
from alphallm_jax.search.options import OptionConfig, has_equation, option_end, solution_answer
from alphallm_jax.search.protocol import EvaluateRequest, ExpandRequest, ExpandResult, NodeScores, RootRequest
from alphallm_jax.search.tree import derive_seed
from alphallm_jax.utils.distributed import fetch

_EXTENSION_STREAM, _ROLLOUT_STREAM = 1, 2


@dataclasses.dataclass(eq=False)
class LMHandle:
    """A search state: the policy's token state and the solution text it holds."""

    seq: SeqState  # prompt tokens (with BOS) followed by the solution's tokens
    prompt: str
    prompt_len: int  # tokens of the prompt at the start of seq.tokens
    text: str = ""  # the solution so far (the prompt excluded)
    primer: SeqState | None = None  # roots: the cached state holding the prompt's keys and values

    @property
    def solution_ids(self) -> tuple[int, ...]:
        return self.seq.tokens[self.prompt_len:]


@dataclasses.dataclass
class BackendStats:
    """Protocol calls, device calls by kind, and every generated token."""

    expand_calls: int = 0
    evaluate_calls: int = 0
    option_sampler_calls: int = 0  # expansion sampling (extensions included)
    rollout_sampler_calls: int = 0
    scorer_calls: int = 0  # CriticScorer.score / score_solutions calls
    options: int = 0
    option_tokens: int = 0  # sampled for options (cut-off text and extensions included)
    rollouts: int = 0
    rollout_tokens: int = 0
    extensions: int = 0
    cut_options: int = 0  # options whose text ran past the solution's end (cut after the final answer line)

    @property
    def generated_tokens(self) -> int:
        return self.option_tokens + self.rollout_tokens

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "generated_tokens": self.generated_tokens}


@dataclasses.dataclass
class _Sample:
    """A sampled continuation before it is cut into an option."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_string: str | None
    state: SeqState | None

    @classmethod
    def of(cls, c: Completion) -> _Sample:
        return cls(c.text, list(c.token_ids), list(c.logprobs), c.finish_reason, c.stop_string, c.state)

    def then(self, more: _Sample) -> _Sample:
        """This sample followed by `more` (sampled from this one's state)."""
        return _Sample(self.text + more.text, self.token_ids + more.token_ids, self.logprobs + more.logprobs,
                       more.finish_reason, more.stop_string, more.state)


class LMSearchBackend:
    """See the module doc.

    Args:
      sampler: the policy's `Sampler` (its KV pool holds the tree's states: size `pool_slots` for it).
      scorer: a `critics.scoring.CriticScorer` (value, PRM, ORM heads; tool checks by its `ToolConfig`).
      task: gsm8k | arith | math (final-answer marker, step separator, grading).
      options: how options and rollouts are sampled and cut.
      rollout_sampler: the fast-rollout policy's sampler; None: the policy rolls out. A different model
        cannot share the policy's KV cache, so it prefills each evaluated node's context once (its rollouts
        share that prefill); with another vocabulary the text is re-tokenised.
    """

    def __init__(self, sampler: Sampler, scorer, *, task: str, options: OptionConfig | None = None,
                 rollout_sampler: Sampler | None = None):
        if sampler.tokenizer is None:
            raise ValueError("the search samples text: build the Sampler with a tokenizer")
        self.sampler = sampler
        self.scorer = scorer
        self.task = task
        self.options = options or OptionConfig()
        self.rollout_sampler = rollout_sampler or sampler
        self.separator = self.options.separator_for(task)
        self.end_stops = self.options.end_stops(task)
        self.option_stops = (self.separator, *self.end_stops)
        self.shared_rollout_vocab = self.rollout_sampler is sampler or _same_vocabulary(
            sampler.tokenizer, self.rollout_sampler.tokenizer)
        self.eos_ids = frozenset(int(e) for e in np.asarray(sampler.eos_ids))
        self.stats = BackendStats()
        self._embedding_table: np.ndarray | None = None

    # ------------------------------------------------------------------------------ the protocol

    def start(self, requests: Sequence[RootRequest]) -> list[LMHandle]:
        """Root states. Each prompt but its last token is prefilled now (one call, one token sampled and
        dropped), so the root's children prefill only that last token however many rounds expand it."""
        roots = [self.sampler.new_state(r.prompt) for r in requests]
        primable = [i for i, s in enumerate(roots) if len(s.tokens) >= 2]
        primers: dict[int, SeqState] = {}
        if primable:
            out = self.sampler.sample([
                SampleRequest(state=SeqState(tokens=roots[i].tokens[:-1]), max_new_tokens=1, temperature=0.0)
                for i in primable], keep_states=True)
            primers = {i: c.state for i, c in zip(primable, out)}
        handles = []
        for i, (r, root) in enumerate(zip(requests, roots)):
            primer = primers.get(i)
            # The primer's slot holds every prompt token but the last (a cached state's slot holds all of
            # its tokens but its last), i.e. a prefix of the root: continuing the root prefills one token.
            seq = SeqState(tokens=root.tokens, parent=primer) if primer is not None else root
            handles.append(LMHandle(seq=seq, prompt=r.prompt, prompt_len=len(root.tokens), primer=primer))
        return handles

    def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        self.stats.expand_calls += 1
        results: list[ExpandResult | None] = [None] * len(requests)
        sample_reqs, owners = [], []
        for i, r in enumerate(requests):
            h: LMHandle = r.parent_handle
            cap = self._room(h, to_end=r.to_end)
            if cap < 1:  # nothing may be added: the solution ends as it is
                results[i] = self._result(r, h, _Sample("", [], [], "length", None,
                                                        self.sampler.extend(h.seq, [])), 0)
                continue
            sample_reqs.append(SampleRequest(
                state=h.seq, max_new_tokens=cap, temperature=self.options.temperature, top_p=self.options.top_p,
                top_k=self.options.top_k, stop=self.end_stops if r.to_end else self.option_stops, seed=r.seed,
                stop_context=h.text, context_stops=self.end_stops))  # "\n" ending a step + "\n": a blank line
            owners.append(i)
        samples = self._sample_options(sample_reqs)
        samples = self._extend_without_equation(requests, owners, samples)
        for i, s in zip(owners, samples):
            results[i] = self._result(requests[i], requests[i].parent_handle, s, len(s.token_ids))
        return results

    def evaluate(self, requests: Sequence[EvaluateRequest]) -> list[NodeScores]:
        self.stats.evaluate_calls += 1
        scores = [NodeScores() for _ in requests]
        rollouts = self._rollouts(requests)
        # A node with rollouts takes v and PRM from its first rollout's scoring pass (same prefix, causal
        # backbone); only nodes without rollouts need a pass of their own.
        self._score_states(requests, scores, skip=[bool(r) for r in rollouts])
        self._score_solutions(requests, rollouts, scores)
        if self.scorer.tools.steps:
            self._fold_step_checks(requests, scores)
        return scores

    def release(self, handles: Sequence[LMHandle]) -> None:
        for h in handles:
            self.sampler.release(h.seq)
            if h.primer is not None:
                self.sampler.release(h.primer)

    # ---------------------------------------------------------------------------------- expand

    def _room(self, h: LMHandle, *, to_end: bool) -> int:
        """New tokens a continuation of `h` may sample: the option cap (none to the end), the solution
        cap and the sampler's sequence length."""
        solution_room = self.options.max_solution_tokens - len(h.solution_ids)
        cap = min(solution_room, self.sampler.max_len - len(h.seq.tokens))
        return cap if to_end else min(cap, self.options.max_option_tokens)

    def _sample_options(self, reqs: list[SampleRequest]) -> list[_Sample]:
        if not reqs:
            return []
        self.stats.option_sampler_calls += 1
        return [_Sample.of(c) for c in self.sampler.sample(reqs, keep_states=True)]

    def _extend_without_equation(self, requests: Sequence[ExpandRequest], owners: list[int],
                                 samples: list[_Sample]) -> list[_Sample]:
        """MATH's rule-based extension: an option with no equation gets one more step (one batched call)."""
        if self.task != "math" or not self.options.math_extension:
            return samples
        todo = []
        for j, (i, s) in enumerate(zip(owners, samples)):
            r, h = requests[i], requests[i].parent_handle
            if r.to_end or has_equation(s.text) or s.state is None:
                continue
            if option_end(h.text, s.text, task=self.task, finish_reason=s.finish_reason,
                          stop_string=s.stop_string, end_stops=self.end_stops).ends_solution:
                continue
            grown = LMHandle(seq=s.state, prompt=h.prompt, prompt_len=h.prompt_len, text=h.text + s.text)
            cap = self._room(grown, to_end=False)
            if cap >= 1:
                todo.append((j, SampleRequest(
                    state=s.state, max_new_tokens=cap, temperature=self.options.temperature,
                    top_p=self.options.top_p, top_k=self.options.top_k, stop=self.option_stops,
                    seed=derive_seed(r.seed, _EXTENSION_STREAM), stop_context=grown.text,
                    context_stops=self.end_stops)))
        if not todo:
            return samples
        self.stats.extensions += len(todo)
        more = self._sample_options([req for _, req in todo])
        samples = list(samples)
        for (j, _), m in zip(todo, more):
            self.sampler.release(samples[j].state)  # the option's state now lies inside the extension's
            samples[j] = samples[j].then(m)
        return samples

    def _result(self, r: ExpandRequest, h: LMHandle, s: _Sample, generated: int) -> ExpandResult:
        """Cut the sample into the option, decide whether it ends the solution, and make its handle."""
        self.stats.options += 1
        self.stats.option_tokens += generated
        end = option_end(h.text, s.text, task=self.task, finish_reason=s.finish_reason, stop_string=s.stop_string,
                         end_stops=self.end_stops)
        s, state = self._cut(h.seq, s, end.keep_chars)
        child = LMHandle(seq=state, prompt=h.prompt, prompt_len=h.prompt_len, text=h.text + s.text)
        final = end.ends_solution or self._room(child, to_end=True) < 1
        answer = solution_answer(child.text, self.task) if final or r.to_end else None
        return ExpandResult(
            text=s.text, token_ids=s.token_ids, logprob=float(np.sum(s.logprobs)), finish_reason=s.finish_reason,
            is_final=final, answer=answer, handle=child, generated_tokens=generated,
            embedding=self._embedding(s.token_ids) if r.want_embedding else None)

    def _cut(self, parent: SeqState, s: _Sample, keep_chars: int) -> tuple[_Sample, SeqState]:
        """`s` shortened to its first `keep_chars` characters (whole tokens) and the state after it."""
        if keep_chars >= len(s.text):
            return s, s.state
        self.stats.cut_options += 1
        ids, text = self.sampler.cut(parent.tokens, s.token_ids, keep_chars)
        if s.state is not None:
            self.sampler.release(s.state)  # the cut state is a fresh child of the parent (never continued)
        cut = _Sample(text, ids, s.logprobs[:len(ids)], "stop", s.stop_string, None)
        return cut, self.sampler.extend(parent, ids)

    def _embedding(self, ids: Sequence[int]) -> np.ndarray:
        """Cosine state merging: the unit-norm mean of the policy's input embeddings of the option's tokens."""
        if self._embedding_table is None:
            self._embedding_table = fetch(self.sampler.model.embed_vd[...]).astype(np.float32)
        rows = [t for t in ids if t not in self.eos_ids]
        if not rows:
            return np.zeros(self._embedding_table.shape[1], np.float32)
        v = self._embedding_table[rows].mean(axis=0)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    # -------------------------------------------------------------------------------- evaluate

    def _score_states(self, requests: Sequence[EvaluateRequest], scores: list[NodeScores],
                      skip: Sequence[bool]) -> None:
        """v(s) and the PRM of the newest step for every non-terminal node not in `skip`, in one scorer call."""
        wanted = [i for i, r in enumerate(requests)
                  if not r.terminal and (r.want_value or r.want_prm) and not skip[i]]
        if not wanted:
            return
        self.stats.scorer_calls += 1
        out = self.scorer.score([requests[i].handle.seq.tokens for i in wanted])
        for j, i in enumerate(wanted):
            if requests[i].want_value:
                scores[i].value = float(out.value[j])
            if requests[i].want_prm:
                scores[i].prm = float(out.prm[j])

    def _fold_step_checks(self, requests: Sequence[EvaluateRequest], scores: list[NodeScores]) -> None:
        """`critics.tools.steps`: each scored state's value and PRM folded with the tool checks of its text
        (the solution so far), as the ORM is with a complete solution's: a wrong calculation costs the
        state its score when it is written."""
        owners = [i for i, s in enumerate(scores) if s.value is not None or s.prm is not None]
        if not owners:
            return
        tools = self.scorer.tools
        questions = ([tools.question_of(requests[i].handle.prompt) for i in owners] if tools.needs_question
                     else None)
        checks = check_solutions([requests[i].handle.text for i in owners], self.task, tools, questions,
                                 complete=False)
        ok = checks_ok(checks, getattr(self.scorer, "lockstep", False))
        for field in ("value", "prm"):
            have = [j for j, i in enumerate(owners) if getattr(scores[i], field) is not None]
            if not have:
                continue
            raw = np.asarray([getattr(scores[owners[j]], field) for j in have], np.float32)
            folded = combine_with_checks(raw, ok[have], self.scorer.tools)
            for j, x in zip(have, folded):
                setattr(scores[owners[j]], field, float(x))

    def _rollouts(self, requests: Sequence[EvaluateRequest]) -> list[list[tuple[str, list[int], int]]]:
        """num_rollouts completions to the end per non-terminal node, in one sampler call. Per request: its
        rollouts as (text after the node, token ids in the policy's vocabulary, tokens sampled), cut like
        final options. A node with no room left is its own (empty) rollout."""
        reqs, owners = [], []
        o = self.options
        out: list[list[tuple[str, list[int], int]]] = [[] for _ in requests]
        for i, r in enumerate(requests):
            if r.terminal or r.num_rollouts < 1:
                continue
            h: LMHandle = r.handle
            state = self._rollout_state(h)
            cap = min(self._room(h, to_end=True), self.rollout_sampler.max_len - len(state.tokens))
            if cap < 1:
                out[i].append(("", [], 0))
                continue
            for k in range(r.num_rollouts):
                reqs.append(SampleRequest(state=state, max_new_tokens=cap, temperature=o.rollout_temperature,
                                          top_p=o.rollout_top_p, top_k=o.rollout_top_k, stop=self.end_stops,
                                          seed=derive_seed(r.seed, _ROLLOUT_STREAM, k), stop_context=h.text,
                                          context_stops=self.end_stops))
                owners.append(i)
        if not reqs:
            return out
        self.stats.rollout_sampler_calls += 1
        completions = self.rollout_sampler.sample(reqs, keep_states=False)
        for i, c in zip(owners, completions):
            h = requests[i].handle
            self.stats.rollouts += 1
            self.stats.rollout_tokens += len(c.token_ids)
            end = option_end(h.text, c.text, task=self.task, finish_reason=c.finish_reason,
                             stop_string=c.stop_string, end_stops=self.end_stops)
            text, ids = c.text, list(c.token_ids)
            if not self.shared_rollout_vocab:
                text = text[:end.keep_chars]
                ids = self.sampler.tokenizer.encode_continuation(text)  # the policy's (and critic's) vocabulary
            elif end.keep_chars < len(text):
                ids, text = self.sampler.cut(h.seq.tokens, ids, end.keep_chars)
            out[i].append((text, ids, len(c.token_ids)))
        return out

    def _rollout_state(self, h: LMHandle) -> SeqState:
        if self.rollout_sampler is self.sampler:
            return h.seq  # cached: the rollouts prefill one token
        if self.shared_rollout_vocab:
            return self.rollout_sampler.new_state(list(h.seq.tokens))
        return self.rollout_sampler.new_state(h.prompt + h.text)

    def _score_solutions(self, requests: Sequence[EvaluateRequest], rollouts, scores: list[NodeScores]) -> None:
        """The ORM (with tool checks) of every terminal node and every rollout, in one scorer call; terminal
        nodes also take their value and newest-step PRM from it, and nodes with rollouts theirs (read at the
        node's last token inside its first rollout)."""
        prompt_ids, solution_ids, texts, owners, prefix_ends = [], [], [], [], []
        for i, r in enumerate(requests):
            h: LMHandle = r.handle
            prompt = list(h.seq.tokens[:h.prompt_len])
            if r.terminal:
                prompt_ids.append(prompt)
                solution_ids.append(list(h.solution_ids))
                texts.append(h.text)
                owners.append((i, None))  # the node itself
                prefix_ends.append(None)
            for k, (text, ids, _) in enumerate(rollouts[i]):
                prompt_ids.append(prompt)
                solution_ids.append(list(h.solution_ids) + list(ids))
                texts.append(h.text + text)
                owners.append((i, k))  # its k-th rollout
                # The node's own v and PRM: read at its last token inside its first rollout.
                wants_state = k == 0 and not r.terminal and (r.want_value or r.want_prm)
                prefix_ends.append(len(h.seq.tokens) - 1 if wants_state else None)
        if not texts:
            return
        self.stats.scorer_calls += 1
        out = self.scorer.score_solutions(prompt_ids, solution_ids, texts, prefix_ends=prefix_ends)
        for j, (i, k) in enumerate(owners):
            if k is not None:
                scores[i].rollouts.append({"text": rollouts[i][k][0], "answer": solution_answer(texts[j], self.task),
                                           "orm": float(out.orm_tool[j])})
                if prefix_ends[j] is not None:
                    if requests[i].want_value:
                        scores[i].value = float(out.prefix_value[j])
                    if requests[i].want_prm:
                        scores[i].prm = float(out.prefix_prm[j])
                continue
            r = requests[i]
            scores[i].orm = float(out.orm_tool[j])
            if r.want_value:
                scores[i].value = float(out.value[j])
            if r.want_prm:  # the last step's; a solution without a step (EOS at once) holds no answer: 0
                scores[i].prm = float(out.prm_steps[j][-1]) if out.prm_steps[j].size else 0.0
        for i, s in enumerate(scores):
            if s.rollouts:
                s.rollout_orm = float(np.mean([r["orm"] for r in s.rollouts]))
                s.rollout_tokens = int(sum(n for _, _, n in rollouts[i]))


def _same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map ids to the same pieces (rollout tokens can then be scored as they are)."""
    if a is b:
        return True
    if a is None or b is None or a.vocab_size != b.vocab_size:
        return False
    return all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))
