"""Batched, jitted critic scoring for the search, reranking and calibration.

    scorer = CriticScorer(critic, tokenizer, task="arith")
    s = scorer.score(token_id_sequences)                 # CriticScores: value, prm, orm per sequence
    s = scorer.score(seqs, step_ends=[[...], ...])       # + value_steps / prm_steps at given indices
    r = scorer.score_solutions(prompt_ids, solution_ids, texts)  # SolutionScores: + tools, PRM aggregate
    r = scorer.score_solutions(..., mean_logprobs=m)     # + orm_combined, with an `OutcomeCombiner`

One backbone pass per sequence gives all three heads. Sequences are sorted by length and packed
into batches whose shapes are bucketed (`utils.shapes`: rows to powers of two, length to geometric
multiples of `len_granule`, read positions to powers of two >= 16), so a stream of different sizes
compiles only a few programs.
Trailing EOS tokens are ignored (a terminal state that sampled EOS scores like the same text without
it). Read positions follow `critics.positions`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphallm_jax.critics.combiner import OutcomeCombiner, solution_features
from alphallm_jax.critics.positions import blank_token_ids, orm_index, step_end_indices, strip_trailing
from alphallm_jax.critics.tools import ToolConfig, check_solutions, combine_with_checks
from alphallm_jax.data.prompts import step_separator
from alphallm_jax.models import sharding as shd
from alphallm_jax.models.critic import HEAD_INDEX, CriticModel
from alphallm_jax.utils.distributed import check_lockstep, coordinator_array, fetch, spans_processes
from alphallm_jax.utils.shapes import MIN_ROWS, bucket_length, pow2_at_least, row_bucket

PRM_AGGREGATES = ("min", "prod", "mean", "last")


@dataclasses.dataclass
class CriticScores:
    """Probabilities per sequence (float32 [n] each) and, when step ends were given, per step."""

    value: np.ndarray  # v(s) at the last token
    prm: np.ndarray  # PRM of the newest step (read at the last token)
    orm: np.ndarray  # ORM at the last non-blank token
    value_steps: list[np.ndarray]  # value at each requested index (empty arrays without step_ends)
    prm_steps: list[np.ndarray]  # PRM at each requested index


@dataclasses.dataclass
class SolutionScores:
    """Complete solutions: critic heads, tool checks and the combined scores (float32 [n] each)."""

    orm: np.ndarray
    orm_tool: np.ndarray  # the ORM combined with the tool checks by `ToolConfig`
    tool_ok: np.ndarray  # 1.0 when no tool check failed
    prm: np.ndarray  # the PRM over the solution's steps, aggregated by `prm_aggregate`
    value: np.ndarray  # value at the last token
    prm_steps: list[np.ndarray]
    tool_failures: list[list[str]]
    # Value and PRM read at `prefix_ends[i]` (NaN where none was asked): a search node scored inside
    # its rollout's sequence, which the causal backbone computes exactly as scoring the node alone.
    prefix_value: np.ndarray | None = None
    prefix_prm: np.ndarray | None = None
    # The outcome combiner's P(right) from the ORM, the tools and the policy's mean token log-probability
    # (`critics.combiner`); None without a combiner or without the log-probabilities.
    orm_combined: np.ndarray | None = None


@functools.partial(jax.jit, static_argnums=(0,))
def _score_batch(graphdef, params, ids_bs: jax.Array, pos_bs: jax.Array, read_bk: jax.Array) -> jax.Array:
    """Sigmoid of every head at the read indices: float32 [b, k, c]."""
    critic = nnx.merge(graphdef, params)
    return jax.nn.sigmoid(critic(ids_bs, positions_bs=pos_bs, read_bk=read_bk))


def aggregate_prm(steps: np.ndarray, how: str) -> float:
    """One score from a solution's per-step PRM probabilities; 0.0 for a solution with no step (an empty
    or blank sample holds no answer, and `prm@k` must never prefer it to a real solution)."""
    if how not in PRM_AGGREGATES:
        raise ValueError(f"prm aggregate {how!r}; choose from {PRM_AGGREGATES}")
    if steps.size == 0:
        return 0.0
    if how == "min":
        return float(np.min(steps))
    if how == "prod":
        return float(np.exp(np.sum(np.log(np.clip(steps, 1e-12, 1.0)))))
    if how == "mean":
        return float(np.mean(steps))
    return float(steps[-1])


def checks_ok(checks, lockstep: bool) -> np.ndarray:
    """float32 1/0 per tool check result; in lockstep (a mesh spanning processes) process 0's: checks under
    a wall-clock budget (MATH's LaTeX) may time out on one host only, and they steer the search."""
    ok = np.asarray([c.ok for c in checks], np.float32)
    return coordinator_array(ok) if lockstep else ok


class CriticScorer:
    """See the module doc. `critic`: a `CriticModel` (placed on `mesh` when one is given)."""

    def __init__(self, critic: CriticModel, tokenizer=None, *, task: str = "arith", max_batch: int = 64,
                 len_granule: int = 32, max_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: shd.ShardingRules | None = None, tools: ToolConfig | None = None,
                 prm_aggregate: str = "min", eos_ids: Collection[int] | None = None,
                 combiner: OutcomeCombiner | None = None, min_rows: int = MIN_ROWS,
                 fine_row_buckets: bool = False):
        if prm_aggregate not in PRM_AGGREGATES:
            raise ValueError(f"prm aggregate {prm_aggregate!r}; choose from {PRM_AGGREGATES}")
        self.critic = critic
        self.tokenizer = tokenizer
        self.task = task
        self.max_batch = max_batch
        self.len_granule = len_granule
        self.min_rows = min_rows
        self.fine_row_buckets = fine_row_buckets
        self.max_len = max_len or critic.model_cfg.max_position_embeddings
        self.mesh = mesh
        self.rules = rules or shd.ShardingRules()
        self.tools = tools if tools is not None else ToolConfig()
        self.prm_aggregate = prm_aggregate
        self.combiner = combiner
        self.separator = step_separator(task)
        self.graphdef, self.params = nnx.split(critic)
        if eos_ids is None:
            eos_ids = set(critic.model_cfg.eos_token_ids) | set(tokenizer.eos_ids if tokenizer else ())
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        pad = {int(tokenizer.pad_id)} if tokenizer is not None else set()
        self._row_multiple = shd.batch_shards(mesh)
        self.lockstep = spans_processes(mesh)  # every process scores the same rows (checked)
        if tokenizer is not None:
            from alphallm_jax.sampling.token_texts import token_texts

            self.token_texts = token_texts(tokenizer, critic.model_cfg.vocab_size)
        else:
            self.token_texts = None
        self.blank_ids = blank_token_ids(self.token_texts or (), self.eos_ids | pad)
        self.calls = 0  # device calls, for benchmarks and tests

    # ------------------------------------------------------------------------------- public API
    def with_combiner(self, combiner: OutcomeCombiner | None) -> CriticScorer:
        """This scorer (same critic, compiled programs and settings) with another outcome combiner: the
        combiner is fitted on this scorer's own ORM scores, so it arrives after the scorer."""
        other = copy.copy(self)
        other.combiner = combiner
        return other

    def score(self, sequences: Sequence[Sequence[int]], *,
              step_ends: Sequence[Sequence[int]] | None = None) -> CriticScores:
        """All three heads for each token sequence; `step_ends[i]` adds reads at those indices of
        sequence i (e.g. every step end of a trajectory: causal, so each equals scoring that prefix)."""
        if step_ends is not None and len(step_ends) != len(sequences):
            raise ValueError(f"{len(step_ends)} step_ends lists for {len(sequences)} sequences")
        n = len(sequences)
        seqs, reads = [], []
        for i, seq in enumerate(sequences):
            ids = strip_trailing(seq, self.eos_ids)
            if not ids:
                raise ValueError(f"sequence {i} is empty (or only EOS)")
            if len(ids) > self.max_len:
                raise ValueError(f"sequence {i} has {len(ids)} tokens; the critic scores at most {self.max_len}")
            extra = [int(e) for e in (step_ends[i] if step_ends is not None else ())]
            if any(not 0 <= e < len(ids) for e in extra):
                raise ValueError(f"step_ends[{i}]={extra} outside the sequence's {len(ids)} tokens (EOS stripped)")
            seqs.append(ids)
            reads.append([len(ids) - 1, orm_index(ids, self.blank_ids), *extra])
        probs = [None] * n
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        for start in range(0, n, self.max_batch):
            chunk = order[start:start + self.max_batch]
            out_bkc = self._run([seqs[i] for i in chunk], [reads[i] for i in chunk])
            for row, i in enumerate(chunk):
                probs[i] = out_bkc[row, :len(reads[i])]
        v, p, o = HEAD_INDEX["value"], HEAD_INDEX["prm"], HEAD_INDEX["orm"]
        return CriticScores(
            value=np.asarray([x[0, v] for x in probs], np.float32).reshape(n),
            prm=np.asarray([x[0, p] for x in probs], np.float32).reshape(n),
            orm=np.asarray([x[1, o] for x in probs], np.float32).reshape(n),
            value_steps=[np.asarray(x[2:, v], np.float32) for x in probs],
            prm_steps=[np.asarray(x[2:, p], np.float32) for x in probs])

    def step_ends(self, ids: Sequence[int], start: int) -> list[int]:
        """The step-end indices of `ids[start:]` (the solution part), EOS stripped."""
        if self.token_texts is None:
            raise ValueError("step ends from tokens need a tokenizer; build the scorer with one")
        return step_end_indices(strip_trailing(ids, self.eos_ids), self.token_texts, self.separator, start=start)

    def score_solutions(self, prompt_ids: Sequence[Sequence[int]], solution_ids: Sequence[Sequence[int]],
                        texts: Sequence[str], *, prefix_ends: Sequence[int | None] | None = None,
                        mean_logprobs: Sequence[float] | None = None) -> SolutionScores:
        """Complete solutions: ORM, PRM over every step, tool checks on `texts`, combined scores.

        `mean_logprobs[i]` (optional): the policy's mean token log-probability of solution i; with the
        scorer's `combiner` it gives `orm_combined`.

        `prefix_ends[i]` (optional) also reads value and PRM at that index of sequence i (prompt + solution):
        the score of the prefix state, from the same backbone pass.
        """
        if not len(prompt_ids) == len(solution_ids) == len(texts):
            raise ValueError("prompt_ids, solution_ids and texts must have the same length")
        if prefix_ends is not None and len(prefix_ends) != len(texts):
            raise ValueError(f"{len(prefix_ends)} prefix_ends for {len(texts)} solutions")
        if mean_logprobs is not None and len(mean_logprobs) != len(texts):
            raise ValueError(f"{len(mean_logprobs)} mean_logprobs for {len(texts)} solutions")
        seqs = [list(p) + list(s) for p, s in zip(prompt_ids, solution_ids)]
        ends = [self.step_ends(seq, len(p)) for seq, p in zip(seqs, prompt_ids)]
        extra = [None] * len(seqs) if prefix_ends is None else list(prefix_ends)
        scores = self.score(seqs, step_ends=[e + ([x] if x is not None else []) for e, x in zip(ends, extra)])
        prm_steps = [pp if x is None else pp[:-1] for pp, x in zip(scores.prm_steps, extra)]
        checks = check_solutions(list(texts), self.task, self.tools, self.questions(prompt_ids))
        ok = checks_ok(checks, self.lockstep)
        prefix_value = prefix_prm = None
        if prefix_ends is not None:
            prefix_value = np.asarray([np.nan if x is None else pv[-1] for pv, x in zip(scores.value_steps, extra)],
                                      np.float32)
            prefix_prm = np.asarray([np.nan if x is None else pp[-1] for pp, x in zip(scores.prm_steps, extra)],
                                    np.float32)
        combined = None
        if self.combiner is not None and mean_logprobs is not None:
            combined = self.combiner.predict(solution_features(scores.orm, ok, mean_logprobs))
        return SolutionScores(
            orm=scores.orm, orm_tool=combine_with_checks(scores.orm, ok, self.tools), tool_ok=ok,
            prm=np.asarray([aggregate_prm(s, self.prm_aggregate) for s in prm_steps], np.float32),
            value=scores.value, prm_steps=prm_steps, tool_failures=[c.failures for c in checks],
            prefix_value=prefix_value, prefix_prm=prefix_prm, orm_combined=combined)

    def questions(self, prompt_ids: Sequence[Sequence[int]]) -> list[str] | None:
        """Each prompt's question, for the checks that read it (None when they are off); decoded once
        per distinct prompt: a search scores many rollouts of one prompt in a call. A prompt without a
        question raises (`ToolConfig.question_of`): a configured check is never skipped in silence."""
        if not self.tools.needs_question:
            return None
        if self.tokenizer is None:
            raise ValueError("critics.tools.question_numbers and critics.tools.operand_sources read each prompt's "
                             "question: build the CriticScorer with the policy's tokenizer")
        keys = [tuple(int(t) for t in p) for p in prompt_ids]
        found = {key: self.tools.question_of(self.tokenizer.decode(list(key))) for key in set(keys)}
        return [found[key] for key in keys]

    # -------------------------------------------------------------------------------- internals

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = shd.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.rules)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _run(self, seqs: list[list[int]], reads: list[list[int]]) -> np.ndarray:
        """One device call for up to max_batch sequences (right-padded, bucketed): [b, k, c]."""
        rows = row_bucket(len(seqs), self._row_multiple, self.min_rows, self.fine_row_buckets)
        # Lengths step by one granule up to 8 granules (not 4): a scoring call is a full forward whose
        # cost grows with the padded length, and search scores mostly 130-200-token solutions, which
        # the coarser 128 -> 192 step padded by up to half (critic time of a 64-problem search: -16%).
        length = min(bucket_length(max(len(s) for s in seqs), self.len_granule, linear_units=8),
                     max(self.max_len, max(len(s) for s in seqs)))
        k = pow2_at_least(max(len(r) for r in reads), 16)  # read slots are cheap; fewer shapes, fewer compiles
        ids_bs = np.zeros((rows, length), np.int32)
        pos_bs = np.full((rows, length), -1, np.int32)
        read_bk = np.zeros((rows, k), np.int32)
        for b, (seq, rd) in enumerate(zip(seqs, reads)):
            ids_bs[b, :len(seq)] = seq
            pos_bs[b, :len(seq)] = np.arange(len(seq))
            read_bk[b, :len(rd)] = rd
        if self.lockstep:
            check_lockstep("critic scorer", (ids_bs, pos_bs, read_bk))
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                out = _score_batch(self.graphdef, self.params, self._put(ids_bs), self._put(pos_bs), self._put(read_bk))
        else:
            out = _score_batch(self.graphdef, self.params, ids_bs, pos_bs, read_bk)
        self.calls += 1
        return fetch(out)
