"""The LM search backend on a tiny random policy and critic: forked KV states (no prefix recompute), one
device call per round and kind, consistent option text and tokens, determinism, separate rollout
policies, the MATH extension, beam search, and the `mcts` / `beam` evaluation methods."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alphallm_jax.critics.scoring import CriticScorer
from alphallm_jax.data.arith import generate_problems
from alphallm_jax.data.prompts import format_prompt
from alphallm_jax.pipeline.eval_methods import EvalContext
from alphallm_jax.pipeline.evaluation import evaluate_methods
from alphallm_jax.pipeline.search_run import SearchSettings, search_problem
from alphallm_jax.sampling import Sampler
from alphallm_jax.search import BeamSearchConfig, MCTSConfig, beam_search, run_mcts
from alphallm_jax.search.lm_backend import LMSearchBackend
from alphallm_jax.search.options import OptionConfig, has_equation, option_end, solution_answer
from alphallm_jax.search.protocol import ExpandRequest, RootRequest
from tests.tiny_lm import arith_tokenizer, random_critic, steered_policy

pytestmark = pytest.mark.slow  # about two minutes on 2 shared CPU cores, mostly compiles

OPTIONS = OptionConfig(max_option_tokens=8, max_solution_tokens=40)
MCTS = MCTSConfig(c_min0=3, c_max0=5, c_min=2, c_max=3, num_simulations=8, min_terminals=2, max_depth=4,
                  num_rollouts=2, leaves_per_tree_per_round=3, merge_threshold=3.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tokenizer = arith_tokenizer(tmp_path_factory.mktemp("tok"))
    policy = steered_policy(tokenizer, seed=0)
    scorer = CriticScorer(random_critic(tokenizer, seed=1), tokenizer, task="arith", len_granule=64)
    problems = generate_problems(n=3, seed=5, split="search")
    return tokenizer, policy, scorer, problems


def _sampler(stack, model=None, fine_row_buckets=False) -> Sampler:
    tokenizer, policy, _, _ = stack
    return Sampler(model or policy, tokenizer, max_len=160, pool_slots=512, max_batch=16,
                   fine_row_buckets=fine_row_buckets)


def _problems(stack, seed=0):
    return [search_problem(p, format_prompt(p, "plain"), seed) for p in stack[3]]


class CallLog:
    """Records every sampler.sample and scorer call, tagged with the backend call it happened in."""

    def __init__(self, backend: LMSearchBackend):
        self.calls: list[tuple[str, str, list, int, list]] = []  # (phase, what, requests, prefilled, outputs)
        self.phase = "start"
        self.in_scorer = 0
        for phase in ("start", "expand", "evaluate"):
            self._wrap_phase(backend, phase)
        samplers = {id(backend.sampler): backend.sampler, id(backend.rollout_sampler): backend.rollout_sampler}
        for sampler in samplers.values():
            name = "policy" if sampler is backend.sampler else "rollout"
            self._wrap_sampler(sampler, name)
        for method in ("score", "score_solutions"):
            self._wrap_scorer(backend.scorer, method)

    def _wrap_phase(self, backend, phase):
        inner = getattr(backend, phase)

        def wrapped(requests):
            self.phase = phase
            return inner(requests)

        setattr(backend, phase, wrapped)

    def _wrap_sampler(self, sampler, name):
        inner = sampler.sample

        def wrapped(requests, **kw):
            before = sampler.stats.prefilled_tokens
            out = inner(requests, **kw)
            self.calls.append((self.phase, name, list(requests), sampler.stats.prefilled_tokens - before, out))
            return out

        sampler.sample = wrapped

    def _wrap_scorer(self, scorer, method):
        inner = getattr(scorer, method)

        def wrapped(*args, **kw):
            if not self.in_scorer:  # score_solutions calls score inside: count the outer call only
                self.calls.append((self.phase, method, [], 0, []))
            self.in_scorer += 1
            try:
                return inner(*args, **kw)
            finally:
                self.in_scorer -= 1

        setattr(scorer, method, wrapped)

    def of(self, phase, what):
        return [c for c in self.calls if c[0] == phase and c[1] == what]


@pytest.fixture(scope="module")
def searched(stack):
    """One lockstep search of three problems, with every device call recorded."""
    sampler = _sampler(stack)
    backend = LMSearchBackend(sampler, stack[2], task="arith", options=OPTIONS)
    log = CallLog(backend)
    from alphallm_jax.search.mcts import LockstepMCTS

    driver = LockstepMCTS(backend, MCTS)
    trees = driver.run(_problems(stack))
    return trees, backend, log, driver


def test_expansions_continue_forked_parent_states_without_prefix_recompute(searched, stack):
    trees, backend, log, _ = searched
    sampler = backend.sampler
    assert sampler.stats.rebuilds == 0 and sampler.stats.evictions == 0
    (primer,) = log.of("start", "policy")
    prompts = [len(stack[0].encode(t.problem.prompt, add_bos=True)) for t in trees]
    assert primer[3] == sum(n - 1 for n in prompts)  # each prompt but its last token, once
    # Every later continuation prefills exactly one token per distinct parent (its pending last token).
    for phase in ("expand", "evaluate"):
        for _, _, requests, prefilled, _ in log.of(phase, "policy"):
            assert prefilled == len({id(r.state) for r in requests})
    unique = sum(prompts) + sum(len(n.option_token_ids) for t in trees for n in t.nodes)
    assert sampler.stats.prefilled_tokens < unique  # options come from the decode, never prefilled again


def test_one_device_call_per_round_and_kind(searched):
    _, backend, log, driver = searched
    assert driver.stats.calls["expand"] == backend.stats.expand_calls == backend.stats.option_sampler_calls
    assert len(log.of("expand", "policy")) == backend.stats.expand_calls  # arith: no extension call
    assert len(log.of("evaluate", "policy")) == backend.stats.rollout_sampler_calls <= backend.stats.evaluate_calls
    assert len(log.of("evaluate", "score")) <= backend.stats.evaluate_calls
    assert len(log.of("evaluate", "score_solutions")) <= backend.stats.evaluate_calls
    assert not log.of("expand", "score") and not log.of("expand", "score_solutions")
    assert backend.stats.rollouts > 0 and backend.stats.scorer_calls == len(log.of("evaluate", "score")) + len(
        log.of("evaluate", "score_solutions"))


def test_trees_are_consistent_and_count_every_generated_token(searched, stack):
    trees, backend, _, _ = searched
    tokenizer = stack[0]
    assert sum(t.generated_tokens for t in trees) == backend.stats.generated_tokens
    assert backend.stats.cut_options > 0  # some samples ran on past the answer line: their tokens were cut too
    for t in trees:
        assert t.chosen_path and t.chosen_path[0] == 0 and t.answer_method
        prompt_ids = tokenizer.encode(t.problem.prompt, add_bos=True)
        for node in t.nodes[1:]:
            ids = [i for n in t.options_to(node.id) for i in n.option_token_ids if i not in (2,)]
            decoded = tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]
            assert decoded == t.solution_text(node.id)  # the text is exactly the tokens'
            assert len(node.option_token_ids) <= OPTIONS.max_option_tokens or node.terminal
            if node.terminal:
                assert node.orm is not None
            else:
                assert node.value is not None and node.prm is not None and node.rollout_orm is not None
                # Each rollout is kept with its answer (the grader's, from the whole solution) and ORM,
                # whose mean is the node's rollout ORM.
                assert node.rollouts and abs(np.mean([r["orm"] for r in node.rollouts]) - node.rollout_orm) < 1e-6
                for r in node.rollouts:
                    assert r["answer"] == solution_answer(t.solution_text(node.id) + r["text"], "arith")
            assert node.option.count("\n") <= 1 or node.terminal  # an option is one step
        assert t.root.value is not None


def test_node_scores_read_inside_rollouts_equal_scoring_the_state_alone(searched, stack):
    """Nodes with rollouts take v and PRM from their first rollout's scoring pass, at the node's last token."""
    trees, backend, log, _ = searched
    tokenizer, _, scorer, _ = stack
    states, want = [], []
    for t in trees:
        prompt_ids = tokenizer.encode(t.problem.prompt, add_bos=True)
        for node in t.nodes:
            if node.terminal or node.value is None:
                continue
            states.append(prompt_ids + [i for n in t.options_to(node.id) for i in n.option_token_ids])
            want.append((node.value, node.prm))
    assert len(states) > 3
    alone = scorer.score(states)
    np.testing.assert_allclose(alone.value, [v for v, _ in want], atol=1e-5)
    with_prm = [i for i, (_, p) in enumerate(want) if p is not None]  # the root has no step to judge
    assert len(with_prm) >= len(want) - len(trees)
    np.testing.assert_allclose(alone.prm[with_prm], [want[i][1] for i in with_prm], atol=1e-5)
    # A separate state pass only in rounds where some node had no rollout (e.g. at the depth limit).
    assert len(log.of("evaluate", "score")) < len(log.of("evaluate", "score_solutions"))


def test_same_seed_same_trees_whatever_the_batching(searched, stack):
    trees, *_ = searched
    again = run_mcts(_problems(stack), LMSearchBackend(_sampler(stack), stack[2], task="arith", options=OPTIONS), MCTS)
    assert [t.to_records() for t in again] == [t.to_records() for t in trees]
    alone = run_mcts(_problems(stack)[1:2], LMSearchBackend(_sampler(stack), stack[2], task="arith", options=OPTIONS),
                     MCTS)
    # Searched alone or in lockstep with others: the same tree (log-probabilities up to float rounding of
    # the differently shaped batches).
    assert _rounded(alone[0].to_records()) == _rounded(trees[1].to_records())
    other = run_mcts(_problems(stack, seed=1)[:1], LMSearchBackend(_sampler(stack), stack[2], task="arith",
                                                                   options=OPTIONS), MCTS)
    assert other[0].to_records() != trees[0].to_records()


def _rounded(records):
    return [{k: round(v, 4) if k == "option_logprob" else v for k, v in r.items()} for r in records]


def test_a_separate_rollout_policy_rolls_out_and_cosine_merging_gets_embeddings(stack):
    fast = _sampler(stack, steered_policy(stack[0], seed=3))
    backend = LMSearchBackend(_sampler(stack), stack[2], task="arith", options=OPTIONS, rollout_sampler=fast)
    assert backend.shared_rollout_vocab
    log = CallLog(backend)
    config = MCTS.replace(merge_distance="cosine", merge_threshold=0.99, num_simulations=4, min_terminals=1)
    trees = run_mcts(_problems(stack)[:2], backend, config)
    assert not log.of("evaluate", "policy") and len(log.of("evaluate", "rollout")) == backend.stats.rollout_sampler_calls
    assert backend.stats.rollouts > 0 and all(t.chosen_path for t in trees)


def test_math_extension_appends_a_step_to_options_without_an_equation(stack):
    sampler = _sampler(stack)
    backend = LMSearchBackend(sampler, stack[2], task="math", options=OPTIONS)
    log = CallLog(backend)
    prompt = "Question: What is 2+3?\nAnswer:\n"
    (root,) = backend.start([RootRequest(0, "p", prompt, 0)])
    requests = [ExpandRequest(tree=0, problem_id="p", parent_id=0, parent_handle=root, prompt=prompt,
                              path_options=(), path_token_ids=(), depth=1, to_end=False, seed=s) for s in range(12)]
    results = backend.expand(requests)
    first, *extension = log.of("expand", "policy")
    firsts = first[4]
    bare = [i for i, c in enumerate(firsts) if not has_equation(c.text) and not option_end(
        "", c.text, task="math", finish_reason=c.finish_reason, stop_string=c.stop_string,
        end_stops=backend.end_stops).ends_solution]
    assert bare, "this policy often writes steps without '='"
    assert len(extension) == 1 and len(extension[0][2]) == backend.stats.extensions == len(bare)
    for i in bare:  # the option is its first step and the appended one
        assert results[i].text.startswith(firsts[i].text) and len(results[i].token_ids) > len(firsts[i].token_ids)
        assert results[i].generated_tokens == len(firsts[i].token_ids) + len(extension[0][4][bare.index(i)].token_ids)
    for i in set(range(len(requests))) - set(bare):
        assert results[i].text == firsts[i].text or results[i].is_final


def test_beam_search_over_the_lm_backend(stack):
    backend = LMSearchBackend(_sampler(stack), stack[2], task="arith", options=OPTIONS)
    config = BeamSearchConfig(beam_width=2, expansions_per_beam=2, max_depth=3)
    trees = beam_search(_problems(stack), backend, config)
    assert all(len(t) > 1 for t in trees)
    assert sum(t.generated_tokens for t in trees) == backend.stats.generated_tokens
    assert backend.sampler.stats.rebuilds == 0


def test_a_prm_guided_beam_scores_an_empty_solution_zero(stack):
    """A policy that writes EOS at once: every child is a terminal empty solution, without a step for the
    PRM to read; it scores 0 (as `aggregate_prm` does), where it stopped the beam, and the evaluation."""
    import numpy as np
    from flax import nnx

    from tests.tiny_lm import SPECIAL_IDS, BiasedDecoder, model_config

    tokenizer = stack[0]
    bias_v = np.full(tokenizer.vocab_size, -30.0, np.float32)
    bias_v[SPECIAL_IDS["eos_id"]] = 30.0
    mute = BiasedDecoder(model_config(tokenizer), bias_v, rngs=nnx.Rngs(0))
    backend = LMSearchBackend(_sampler(stack, mute), stack[2], task="arith", options=OPTIONS)
    (tree,) = beam_search(_problems(stack)[:1], backend, BeamSearchConfig(beam_width=2, expansions_per_beam=2,
                                                                          max_depth=3, guide="prm"))
    children = tree.nodes[1:]
    assert children and all(n.terminal and n.option == "" and n.prm == 0.0 for n in children)


def test_mcts_and_beam_evaluation_methods_run_end_to_end(stack, tmp_path):
    tokenizer, policy, scorer, problems = stack
    sampler = _sampler(stack)
    settings = SearchSettings(mcts=MCTS, beam=BeamSearchConfig(beam_width=2, expansions_per_beam=2, max_depth=3),
                              options=OPTIONS)

    class EvalCfg:
        max_new_tokens, temperature, top_p, top_k, stop = 32, 1.0, 1.0, 0, ("\n\n", "\nQuestion:")

    ctx = EvalContext(sampler=sampler, task="arith", prompt_for=lambda p: format_prompt(p, "plain"),
                      eval_cfg=EvalCfg, seed=0, components={"critic": scorer, "search": settings})
    summary = evaluate_methods(list(problems), ctx, ["greedy", "mcts", "mcts@4", "beam@2"], tmp_path, batch_size=8)
    for spec in ("mcts", "mcts@4", "beam@2"):
        s = summary[spec]
        assert s["n"] == 3 and 0.0 <= s["accuracy"] <= 1.0 and s["mean_nodes"] > 1 and s["mean_generated_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "mcts" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["extra"]["answer_method"] for r in rows)
    backend = ctx.components["search_backend"]
    assert isinstance(backend, LMSearchBackend)
    # mcts_lean: the same search without fast rollouts, answered by the ORM vote over its terminals.
    rollouts = backend.stats.rollouts
    lean = evaluate_methods(list(problems), ctx, ["mcts_lean@4"], tmp_path, batch_size=8)["mcts_lean@4"]
    assert lean["n"] == 3 and lean["mean_nodes"] > 1 and backend.stats.rollouts == rollouts
    rows = [json.loads(line) for line in (tmp_path / "eval" / "mcts_lean_4" / "predictions.jsonl").read_text().splitlines()]
    assert {r["extra"]["answer_method"] for r in rows} <= {"orm_vote", "greedy_q"}


class _ClockedSampler:
    """Decodes `max_new_tokens` tokens per row on a fake clock: a call costs `base_s` plus `per_token_s`
    per step, except that the first `noisy_calls` calls all cost `base_s` (noise hiding the decoding)."""

    def __init__(self, clock, *, base_s=1.0, per_token_s=0.01, noisy_calls=0, max_len=100):
        self.clock, self.base_s, self.per_token_s, self.noisy_calls, self.max_len = (
            clock, base_s, per_token_s, noisy_calls, max_len)
        self.calls = []

    def new_state(self, prompt):
        return tuple(prompt)

    def sample(self, requests, keep_states):
        steps = max(r.max_new_tokens for r in requests)
        self.calls.append(steps)
        self.clock[0] += self.base_s + (0.0 if len(self.calls) <= self.noisy_calls else self.per_token_s * steps)
        return [type("C", (), {"token_ids": [0] * r.max_new_tokens})() for r in requests]


def test_decode_row_cost_measures_again_with_more_tokens_when_noise_hides_the_decoding(monkeypatch):
    from alphallm_jax.benchmarks import search_bench

    clock = [0.0]
    monkeypatch.setattr(search_bench.time, "perf_counter", lambda: clock[0])
    prompts = [[1, 2, 3], [1, 4]]
    # The first measurement (2 untimed + 2 x 3 timed calls) sees no difference: the second one, with 64
    # new tokens and 5 repeats, measures the 63 extra steps of 2 rows: 0.63 s / 126 tokens.
    sampler = _ClockedSampler(clock, noisy_calls=8)
    cost = search_bench.decode_row_cost(sampler, prompts, 2)
    assert cost == pytest.approx(0.01 * 63 / (2 * 63))
    assert sampler.calls[:8] == [32, 1] * 4 and sampler.calls[8:] == [64, 1] * 6
    # New tokens stop at the room the sampler's max_len leaves after the longest prompt (here 97).
    sampler = _ClockedSampler(clock, noisy_calls=8 + 12)
    search_bench.decode_row_cost(sampler, prompts, 2)
    assert sampler.calls[20:] == [97, 1] * 8
    with pytest.raises(RuntimeError, match="no measurable time .* in 3 measurements"):
        search_bench.decode_row_cost(_ClockedSampler(clock, noisy_calls=10**6), prompts, 2)
    with pytest.raises(ValueError, match="no room"):
        search_bench.decode_row_cost(_ClockedSampler(clock, max_len=4), prompts, 2)


def test_search_bench_times_both_modes_on_the_same_trees(stack):
    from alphallm_jax.benchmarks.search_bench import run_search_bench

    tokenizer, problems = stack[0], _problems(stack)
    prompt_tokens = {p.problem_id: len(tokenizer.encode(p.prompt, add_bos=True)) for p in problems}
    prompt_ids = [tokenizer.encode(p.prompt, add_bos=True) for p in problems]
    made = []

    def backend(fine=False):
        made.append(fine)
        return LMSearchBackend(_sampler(stack, fine_row_buckets=fine), stack[2], task="arith", options=OPTIONS)

    result = run_search_bench(backend, problems, MCTS, prompt_tokens, sequential_problems=2, prompt_ids=prompt_ids,
                              repeats=2, variants={"fine": lambda: backend(fine=True)})
    batched, sequential = result["batched"], result["sequential"]
    assert batched["problems"] == 3 and sequential["problems"] == 2 and batched["nodes"] > sequential["nodes"] > 0
    # Every side runs once untimed, then once per timed round (a fresh backend each time; one more for the
    # decode costs); rates are medians over the rounds and the speed-up the median of the rounds' ratios.
    assert made.count(True) == 3 and made.count(False) == 2 * 3 + 1
    assert len(batched["seconds_per_round"]) == len(sequential["seconds_per_round"]) == 2
    ratios = [(batched["nodes"] / b) / (sequential["nodes"] / q)
              for b, q in zip(batched["seconds_per_round"], sequential["seconds_per_round"])]
    assert result["speedup_per_round"] == pytest.approx(ratios)
    assert result["speedup"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert result["batched_nodes_per_s"] == pytest.approx(batched["nodes"] / batched["seconds"])
    fine = result["variants"]["fine"]
    assert fine["nodes"] == batched["nodes"] and fine["nodes_per_s"] > 0 and fine["vs_batched"] > 0
    # Three trees in lockstep send larger rounds to the sampler than one tree at a time; the decoding cost
    # per row and token is measured at both sizes (the policy rolls out itself: one sampler).
    assert batched["rows_per_round"]["policy"] > sequential["rows_per_round"]["policy"] >= 1
    cost = result["decode_row_cost"]["policy"]
    assert cost["rows"]["batched"] == round(batched["rows_per_round"]["policy"])
    assert all(t > 0 for t in cost["us_per_row_token"].values())
    assert cost["decode_batching_gain"] == pytest.approx(
        cost["us_per_row_token"]["sequential"] / cost["us_per_row_token"]["batched"])
    # Expansions fork their parents' cached states: prefill covers each prompt once plus a few re-primed
    # tokens, never a parent's whole prefix again.
    assert batched["unique_tokens"] > sum(prompt_tokens.values())
    assert 0.0 < result["prefill_to_unique_tokens"] <= 1.1
    with pytest.raises(ValueError, match="at least one problem"):
        run_search_bench(lambda: None, problems, MCTS, prompt_tokens, sequential_problems=0)
    with pytest.raises(ValueError, match="repeats"):
        run_search_bench(lambda: None, problems, MCTS, prompt_tokens, sequential_problems=1, repeats=0)
