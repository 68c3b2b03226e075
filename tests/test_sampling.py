"""The sampling engine: greedy parity with transformers, sampling statistics, forking, stop rules."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from alphallm_jax.models.hf_io import load_hf_checkpoint
from alphallm_jax.models.sharding import make_mesh
from alphallm_jax.models.tokenizer import Tokenizer
from alphallm_jax.sampling import Sampler, SampleRequest, engine
from alphallm_jax.sampling.stop_rules import StopTables, build_stop_table, ending_stop, strip_stop
from tests.helpers import MISTRAL_TOKENIZER, require_shared_data

VOCAB = 32000  # the Mistral sentencepiece vocabulary, so decoded text is real text


def _save_tiny_hf(tmp_path, arch: str, *, sliding_window=None, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "mistral":
        config = transformers.MistralConfig(sliding_window=sliding_window, **common)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # peaked logits: greedy has clear winners, sampling a few likely tokens
        model.lm_head.weight.mul_(40.0)
    model = model.float().eval()
    path = tmp_path / arch
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def tokenizer():
    require_shared_data()
    return Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, hf_model = _save_tiny_hf(tmp_path_factory.mktemp("llama"), "llama")
    model, _ = load_hf_checkpoint(path)
    return model, hf_model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path, hf_model = _save_tiny_hf(tmp_path_factory.mktemp("mistral"), "mistral", sliding_window=8)
    model, _ = load_hf_checkpoint(path)
    return model, hf_model


def _prompts(n, seed=0, lo=3, hi=14):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, VOCAB, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.mark.parametrize("which", ["llama", "mistral"])
@pytest.mark.parametrize("chunk_slots", [-1, 4])  # one cache chunk; chunks of 4 slots, most skipped early on
def test_greedy_matches_transformers_generate(which, chunk_slots, request, tokenizer):
    model, hf_model = request.getfixturevalue(which)
    prompts = _prompts(4, seed=1)
    max_new = 24  # prompt + new > the Mistral window of 8
    sampler = Sampler(model, tokenizer, max_len=64, kv_chunk_slots=chunk_slots)
    cache = sampler._new_cache(8, 64)  # Mistral: a ring of 15 slots
    assert len(cache.chunk_lengths) == (1 if chunk_slots < 0 else -(-cache.cache_len // chunk_slots))
    reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=max_new, temperature=0.0) for p in prompts]
    ours = sampler.sample(reqs, keep_states=False)
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert completion.token_ids == ref[0, len(prompt):].tolist()
        assert completion.finish_reason == "length"


def _first_token_distribution(model, prompt, temperature, top_p, top_k):
    logits = np.asarray(model(np.array([prompt], np.int32))[0, -1], np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros_like(probs, bool)
    mass = np.cumsum(probs[order]) - probs[order]
    kept = order[mass < top_p]
    if top_k:
        kept = kept[:top_k]
    keep[kept] = True
    truncated = np.where(keep, probs, 0.0)
    return truncated / truncated.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5)])
def test_sampled_tokens_follow_the_truncated_softmax(llama, tokenizer, temperature, top_p, top_k):
    model, _ = llama
    prompt = _prompts(1, seed=7)[0]
    expected = _first_token_distribution(model, prompt, temperature, top_p, top_k)
    n = 4096
    sampler = Sampler(model, tokenizer, max_len=32, max_batch=n)
    root = sampler.new_state(prompt)
    reqs = [SampleRequest(state=root, max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=i)
            for i in range(n)]
    tokens = np.array([c.token_ids[0] for c in sampler.sample(reqs, keep_states=False)])
    counts = np.bincount(tokens, minlength=VOCAB) / n
    assert np.all(counts[expected == 0] == 0), "sampled a token that top-p/top-k removed"
    tv = 0.5 * np.abs(counts - expected).sum()
    assert tv < 0.04, f"total variation {tv:.3f} between sampled and expected distributions"
    # One prefill for the shared prompt, forked into every sample.
    assert sampler.stats.prefilled_tokens == len(prompt)


def test_logprobs_are_untempered(llama, tokenizer):
    model, _ = llama
    prompt = _prompts(1, seed=3)[0]
    sampler = Sampler(model, tokenizer, max_len=32)
    (completion,) = sampler.sample([SampleRequest(state=sampler.new_state(prompt), max_new_tokens=3,
                                                  temperature=2.0, top_k=3, seed=5)], keep_states=False)
    ids = prompt + completion.token_ids
    logits = np.asarray(model(np.array([ids], np.int32))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion.token_ids)]
    np.testing.assert_allclose(completion.logprobs, expected, atol=2e-4)


@pytest.mark.parametrize("which", ["llama", "mistral"])
@pytest.mark.parametrize("temperature,chunk_slots", [(0.0, -1), (1.0, -1), (1.0, 16)])
def test_forked_continuation_equals_decoding_from_scratch(which, request, tokenizer, temperature, chunk_slots):
    model, _ = request.getfixturevalue(which)
    prompts = _prompts(3, seed=11)
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=16, kv_chunk_slots=chunk_slots)
    roots = [sampler.new_state(p) for p in prompts]
    first = sampler.sample([SampleRequest(state=r, max_new_tokens=9, temperature=temperature, seed=i)
                            for i, r in enumerate(roots)])
    # Three children per first option, each continued from the forked parent state.
    children = sampler.sample([SampleRequest(state=c.state, max_new_tokens=12, temperature=temperature, seed=100 + j)
                               for c in first for j in range(3)])
    hits = sampler.stats.cache_hits
    assert hits == 9
    scratch = Sampler(model, tokenizer, max_len=96, kv_chunk_slots=chunk_slots)
    for idx, child in enumerate(children):
        parent = first[idx // 3]
        context = list(parent.state.tokens)
        (again,) = scratch.sample([SampleRequest(state=scratch.new_state(context), max_new_tokens=12,
                                                 temperature=temperature, seed=100 + idx % 3)], keep_states=False)
        assert child.token_ids == again.token_ids
        np.testing.assert_allclose(child.logprobs, again.logprobs, atol=1e-4)
    # Only the pending token of each parent was prefilled for the children.
    assert scratch.stats.prefilled_tokens > sampler.stats.prefilled_tokens


def test_stragglers_continue_in_a_smaller_batch_with_the_same_results(llama, tokenizer):
    """Rows of one batch stop at very different lengths; once few still run they continue in a compacted
    batch. Tokens, log-probabilities and kept states equal sampling each request alone."""
    model, _ = llama
    prompts = _prompts(32, seed=13)
    caps = [2] * 28 + [30, 31, 33, 40]  # 4 of 32 rows run long: the loop shrinks to 8 rows (MIN_ROWS)
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=64)
    reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=cap, temperature=1.0, seed=i)
            for i, (p, cap) in enumerate(zip(prompts, caps))]
    batched = sampler.sample(reqs)
    assert sampler.stats.compactions >= 1
    alone = Sampler(model, tokenizer, max_len=96)
    for req, got in zip(reqs, batched):
        (want,) = alone.sample([dataclasses.replace(req, state=alone.new_state(list(req.state.tokens)))],
                               keep_states=False)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    # The long rows' kept KV states were written back from the compacted batch: continuing them equals
    # decoding the whole text from scratch.
    more = sampler.sample([SampleRequest(state=c.state, max_new_tokens=5, temperature=0.0) for c in batched[-4:]],
                          keep_states=False)
    for c, m in zip(batched[-4:], more):
        (want,) = alone.sample([SampleRequest(state=alone.new_state(list(c.state.tokens)), max_new_tokens=5,
                                              temperature=0.0)], keep_states=False)
        assert m.token_ids == want.token_ids


def test_a_batch_at_the_smallest_row_bucket_finishes_without_compacting(llama, tokenizer):
    """With `min_rows` 32 a 32-row batch has nowhere smaller to go: its loop must run every row to the
    end (it once exited into a batch of its own size, again and again, and never finished); a 64-row
    batch still compacts into 32 rows. The tokens equal the default buckets', and those of 1.5x buckets
    (`fine_row_buckets`: the 40 requests of the second call run as 48 rows, not 64)."""
    from alphallm_jax.sampling import engine

    assert engine.shrink_below(32, 32) == 0 and engine.shrink_below(64, 32) == 16
    assert engine.shrink_below(32, 8) == engine.shrink_below(32) == 8
    model, _ = llama
    prompts = _prompts(40, seed=17)
    caps = [2] * 28 + [20, 21, 23, 30] + [2] * 8  # in the first 32 requests, 4 run long
    results = []
    for min_rows, fine in ((8, False), (32, False), (8, True)):
        sampler = Sampler(model, tokenizer, max_len=96, pool_slots=2, min_rows=min_rows, fine_row_buckets=fine)
        reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=cap, temperature=1.0, seed=i)
                for i, (p, cap) in enumerate(zip(prompts, caps))]
        got = sampler.sample(reqs[:32], keep_states=False)  # 32 rows
        assert sampler.stats.compactions == (1 if min_rows == 8 else 0)
        got += sampler.sample(reqs[32:] + reqs[:32], keep_states=False)  # 64 rows (48 fine): compacts either way
        assert sampler.stats.compactions >= (2 if min_rows == 8 else 1)
        results.append([c.token_ids for c in got])
    assert results[0] == results[1] == results[2]


def test_evicted_state_is_rebuilt_from_its_nearest_cached_ancestor(llama, tokenizer):
    model, _ = llama
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=3)  # 2 usable slots
    root = sampler.new_state(_prompts(1, seed=5)[0])
    (a,) = sampler.sample([SampleRequest(state=root, max_new_tokens=6, temperature=0.0)])
    (b,) = sampler.sample([SampleRequest(state=a.state, max_new_tokens=6, temperature=0.0)])
    (c,) = sampler.sample([SampleRequest(state=b.state, max_new_tokens=6, temperature=0.0)])
    assert a.state.slot is None and sampler.stats.evictions == 1  # a evicted, b and c cached
    sampler.release(b.state)  # b forgotten: continuing c still hits c itself
    (d,) = sampler.sample([SampleRequest(state=a.state, max_new_tokens=6, temperature=0.0)])
    assert sampler.stats.rebuilds == 1
    assert d.token_ids == b.token_ids  # rebuilt state continues exactly like the original


def test_a_batch_keeping_more_states_than_the_pool_holds_caches_what_fits(llama, tokenizer):
    # 4 requests into 2 usable slots: the first two are cached, the other two count as evicted at once
    # (before, the pool raised and lost the slots it had taken, failing every later call too).
    model, _ = llama
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=3)
    roots = [sampler.new_state(p) for p in _prompts(4, seed=6)]
    outs = sampler.sample([SampleRequest(state=r, max_new_tokens=4, temperature=0.0) for r in roots])
    assert [o.state.slot is not None for o in outs] == [True, True, False, False]
    assert sampler.stats.evictions == 2 and sampler._pool.num_cached == 2
    # Continuing a dropped state rebuilds it from scratch, exactly as an uninterrupted generation runs.
    (more,) = sampler.sample([SampleRequest(state=outs[3].state, max_new_tokens=4, temperature=0.0)])
    assert sampler.stats.rebuilds == 1
    (whole,) = Sampler(model, tokenizer, max_len=96, pool_slots=3).sample(
        [SampleRequest(state=roots[3], max_new_tokens=8, temperature=0.0)])
    assert outs[3].token_ids + more.token_ids == whole.token_ids


def _evicted_state(sampler):
    """A state kept and then evicted (the pool's 2 usable slots taken by its child and grandchild)."""
    root = sampler.new_state(_prompts(1, seed=5)[0])
    (a,) = sampler.sample([SampleRequest(state=root, max_new_tokens=6, temperature=0.0)])
    (b,) = sampler.sample([SampleRequest(state=a.state, max_new_tokens=6, temperature=0.0)])
    sampler.sample([SampleRequest(state=b.state, max_new_tokens=6, temperature=0.0)])
    assert a.state.slot is None and a.state.was_cached
    return a.state


def _from_scratch(model, tokenizer, req):
    scratch = Sampler(model, tokenizer, max_len=96)
    (out,) = scratch.sample([dataclasses.replace(req, state=scratch.new_state(list(req.state.tokens)))],
                            keep_states=False)
    return out


# mistral: a ring of 15 slots, outgrown by the state; chunk_slots -1: a whole-read cache, which a call
# keeping no state otherwise sizes to its own needs, not to the pool's slots.
@pytest.mark.parametrize("which,chunk_slots", [("llama", 0), ("llama", -1), ("mistral", 0)])
def test_a_rebuilt_state_is_cached_again(which, chunk_slots, request, tokenizer):
    """An evicted state continued twice is rebuilt once: the rebuild goes back into the pool, holding
    every token but the pending one, so the second continuation prefills that token alone. Both sample
    what decoding the state from scratch samples."""
    model, _ = request.getfixturevalue(which)
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=3, kv_chunk_slots=chunk_slots)  # 2 usable slots
    state = _evicted_state(sampler)
    hits = sampler.stats.cache_hits
    again = SampleRequest(state=state, max_new_tokens=8, temperature=1.0, seed=3)
    outs, prefilled = [], []
    for _ in range(2):
        before = sampler.stats.prefilled_tokens
        outs.append(sampler.sample([again], keep_states=False)[0])
        prefilled.append(sampler.stats.prefilled_tokens - before)
        slot = state.slot
        assert slot is not None
        last_cached = int(np.max(np.asarray(sampler._pool.cache.slot_pos_bt[slot])))
        assert last_cached == len(state) - 2  # every token but the pending one
    assert sampler.stats.rebuilds == 1 and sampler.stats.cache_hits == hits + 1
    assert prefilled == [len(state), 1]  # from scratch (no cached ancestor), then the pending token
    want = _from_scratch(model, tokenizer, again)
    for out in outs:
        assert out.token_ids == want.token_ids
        np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-4)


@pytest.mark.parametrize("which,num_extra,cached", [("llama", 9, True), ("mistral", 7, True), ("mistral", 8, False)])
def test_a_state_rebuilt_with_extra_tokens_is_cached_without_them(which, num_extra, cached, request, tokenizer):
    """A rebuild's prefilled row also holds the pending token and the request's extra tokens: the cached
    copy forgets them. In a ring (Mistral, window 8: 15 slots, chunks of 8 tokens) the pending token and 7
    extra tokens fit one chunk; with 8, their writes overwrote a key the state's window still needs, so
    the state is not cached (cached, it continued with other log-probabilities). Either way continuing
    it later samples what decoding it from scratch samples."""
    model, _ = request.getfixturevalue(which)
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=3)
    state = _evicted_state(sampler)
    extra = tuple(_prompts(1, seed=8, lo=num_extra, hi=num_extra + 1)[0][1:])
    sampler.sample([SampleRequest(state=state, extra_tokens=extra, max_new_tokens=6, temperature=0.0)],
                   keep_states=False)
    is_cached = state.slot is not None
    later = SampleRequest(state=state, max_new_tokens=12, temperature=0.0)
    (out,) = sampler.sample([later], keep_states=False)
    want = _from_scratch(model, tokenizer, later)
    assert out.token_ids == want.token_ids
    np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-4)
    assert is_cached == cached and sampler.stats.rebuilds == (1 if cached else 2)


def test_a_rebuilt_state_is_cached_from_a_row_whose_tail_fits_the_ring(mistral, tokenizer):
    """Two requests rebuild one evicted state in a ring cache (Mistral, window 8): the first carries 8
    extra tokens, whose writes overwrote keys the state's window needs, the second none. The state is
    cached from the second's row, so continuing it later prefills its pending token alone."""
    model, _ = mistral
    sampler = Sampler(model, tokenizer, max_len=96, pool_slots=3)
    state = _evicted_state(sampler)
    extra = tuple(_prompts(1, seed=8, lo=8, hi=9)[0][1:])
    sampler.sample([SampleRequest(state=state, extra_tokens=extra, max_new_tokens=6, temperature=0.0),
                    SampleRequest(state=state, max_new_tokens=6, temperature=0.0)], keep_states=False)
    assert state.slot is not None and sampler.stats.rebuilds == 2  # one state, two requests
    later = SampleRequest(state=state, max_new_tokens=12, temperature=0.0)
    before = sampler.stats.prefilled_tokens
    (out,) = sampler.sample([later], keep_states=False)
    assert sampler.stats.prefilled_tokens - before == 1
    want = _from_scratch(model, tokenizer, later)
    assert out.token_ids == want.token_ids
    np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-4)


def test_cut_keeps_the_fewest_tokens_that_spell_the_text(llama, tokenizer):
    """`Sampler.cut`, where options, solutions and reranked samples end: tokens wholly past `chars`
    characters go, a token the cut falls inside stays, and the text is decoded as in the whole sequence."""
    sampler = Sampler(llama[0], tokenizer, max_len=64)
    context = tokenizer.encode("Question: 2+3?\nAnswer:\n", add_bos=True)
    ids = tokenizer.encode("Question: 2+3?\nAnswer:\n2+3=5\n#### 5\n\nQuestion: next", add_bos=True)[len(context):]
    full = sampler.decode_after(context, ids)
    assert full == "2+3=5\n#### 5\n\nQuestion: next"
    for text in ("2+3=5\n#### 5", "2+3=5\n", "2", ""):
        kept, kept_text = sampler.cut(context, ids, len(text))
        assert kept_text.startswith(text) and kept == ids[:len(kept)]
        assert len(sampler.decode_after(context, kept[:-1])) < len(text) if kept else text == ""
    assert sampler.cut(context, ids, len(full)) == (ids, full)


def test_ending_stop_is_the_first_to_end_and_on_a_tie_the_longer():
    assert ending_stop("12\nAnswer:\n", ("\n", "Answer:")) == "\n"
    assert ending_stop("Answer:\n", ("\n", "Answer:")) == "Answer:"  # sorted first: "\n"
    assert ending_stop("x\n\n", ("\n\n", "x\n")) == "x\n"
    assert ending_stop("ab", ("b", "ab")) == "ab" and ending_stop("ab", ("ab", "b")) == "ab"
    assert ending_stop("abc", ("x", "y")) is None


def test_strip_stop_drops_the_longest_stop_the_text_ends_with():
    # A "\n\n" sampled as one token ends the text with "\n" too: both go, whatever the config's order.
    assert strip_stop("#### 5\n\n", ("\n", "\n\n")) == "#### 5"
    assert strip_stop("#### 5\n\n", ("\n\n", "\n")) == "#### 5"
    assert strip_stop("#### 5\nQuestion:", ("\n\n", "\nQuestion:")) == "#### 5"
    assert strip_stop("#### 5", ("\n\n", "")) == "#### 5"


@pytest.mark.parametrize("stops,ended_by", [
    (("ns", " Answer"), "ns"),  # both complete in the first token; sorted first: " Answer"
    (("er", "wer"), "wer"),  # both end with the first token; sorted first: "er"
    (("r A", " Answer Answer"), "r A"),  # both complete in the second token, across the token boundary
])
def test_the_stop_string_is_the_one_that_ended_the_text(llama, tokenizer, stops, ended_by):
    """A policy that only writes the piece "\u2581Answer": when several stop strings complete in its last token,
    `stop_string` names the one that ended the text, not the first in sorted order."""
    from flax import nnx

    from tests.tiny_lm import BiasedDecoder

    model, _ = llama
    (answer,) = tokenizer.encode("Answer")
    bias_v = np.zeros(model.cfg.vocab_size, np.float32)
    bias_v[answer] = 100.0
    policy = BiasedDecoder(model.cfg, bias_v, rngs=nnx.Rngs(0))
    sampler = Sampler(policy, tokenizer, max_len=32)
    (out,) = sampler.sample([SampleRequest(state=sampler.new_state("Question:"), max_new_tokens=8, temperature=0.0,
                                           stop=stops)], keep_states=False)
    assert out.finish_reason == "stop" and set(out.token_ids) == {answer}
    assert out.stop_string == ended_by


def test_stop_table_matches_across_token_boundaries():
    texts = (b"a", b"#", b"##", b" #", b"x\n", b"\n", b"b#")
    table = build_stop_table("####", texts)
    state = 0
    for token in (2, 6):  # "##" then "b#": no match, the b breaks the run
        state = table[state, token]
    assert state == 1
    for token in (2, 1):  # "#" after "##" + "#": 4 in a row
        state = table[state, token]
    assert state == 4
    nl = StopTables(("\n", "\n\n"), texts)
    assert nl.table_kqv[0, 0, 4] == 1 and nl.table_kqv[1, 0, 4] == 1 and nl.table_kqv[1, 1, 5] == 2
    # A token without text (a special token decoding to nothing) leaves every state where it was: the
    # decoded "\n" + "" + "\n" holds the stop string, so the automaton must still see it.
    table = build_stop_table("\n\n", (b"\n", b"", b"a"))
    assert table[1, 1] == 1 and table[0, 1] == 0 and table[1, 2] == 0 and table[table[1, 1], 0] == 2


def test_different_stop_sets_and_lengths_share_one_decode_compile(llama, tokenizer):
    """Stop tables are padded and cache lengths rounded, so samplers built by different stages (other
    stop strings, slightly different max_len) reuse the compiled decode loop."""
    model, _ = llama
    prompt = _prompts(1, seed=22)[0]
    runs = [(58, ("\n",)), (64, ("\n\n", "\nQuestion:")), (61, ())]
    before = None
    for max_len, stop in runs:
        sampler = Sampler(model, tokenizer, max_len=max_len)
        sampler.sample([SampleRequest(state=sampler.new_state(prompt), max_new_tokens=12, temperature=0.0,
                                      stop=stop)], keep_states=True)
        before = engine.decode._cache_size() if before is None else before
    assert engine.decode._cache_size() == before


def test_greedy_rows_give_the_same_tokens_alone_and_in_a_sampled_batch(llama, tokenizer):
    """An all-greedy batch runs the greedy program (no random draws; tests/test_token_sampling.py), a
    mixed one the sampling program: the greedy row's tokens and log-probabilities are the same in both."""
    model, _ = llama
    prompt = _prompts(1, seed=23)[0]
    sampler = Sampler(model, tokenizer, max_len=48)
    greedy = SampleRequest(state=sampler.new_state(prompt), max_new_tokens=10, temperature=0.0)
    (alone,) = sampler.sample([greedy], keep_states=False)
    mixed = sampler.sample([greedy, dataclasses.replace(greedy, temperature=1.0, seed=3)], keep_states=False)
    assert mixed[0].token_ids == alone.token_ids
    np.testing.assert_allclose(mixed[0].logprobs, alone.logprobs, atol=1e-6)


def test_stop_strings_and_eos_end_rows_on_device(llama, tokenizer):
    model, _ = llama
    prompt = _prompts(1, seed=21)[0]
    sampler = Sampler(model, tokenizer, max_len=64)
    (free,) = sampler.sample([SampleRequest(state=sampler.new_state(prompt), max_new_tokens=30, temperature=0.0)],
                             keep_states=False)
    text = free.text
    # A stop string that spans a token boundary inside the greedy text: generation ends at the token
    # that completes its first occurrence.
    cut = len(tokenizer.decode(free.token_ids[:6]))
    stop = text[max(0, cut - 3):cut + 2]
    (stopped,) = sampler.sample([SampleRequest(state=sampler.new_state(prompt), max_new_tokens=30, temperature=0.0,
                                               stop=(stop,))], keep_states=False)
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stop in stopped.text and stopped.text.find(stop) + len(stop) > len(stopped.text) - 20
    assert stop not in sampler.decode_after(tuple(prompt), stopped.token_ids[:-1])
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]
    # EOS: make the 5th greedy token the end-of-sequence token.
    eos_sampler = Sampler(model, tokenizer, max_len=64, eos_ids=(free.token_ids[4],))
    (ended,) = eos_sampler.sample([SampleRequest(state=eos_sampler.new_state(prompt), max_new_tokens=30,
                                                 temperature=0.0)], keep_states=False)
    first_eos = free.token_ids.index(free.token_ids[4])
    assert ended.finish_reason == "eos" and ended.token_ids == free.token_ids[:first_eos + 1]


def test_generate_api_same_seed_same_output(llama, tokenizer):
    model, _ = llama
    sampler = Sampler(model, tokenizer, max_len=64)
    prompts = ["Question: Tom has 3 apples.", "Answer:"]
    one = sampler.generate(prompts, max_new_tokens=8, temperature=1.0, num_samples=3, seed=4)
    two = sampler.generate(prompts, max_new_tokens=8, temperature=1.0, num_samples=3, seed=4)
    other = sampler.generate(prompts, max_new_tokens=8, temperature=1.0, num_samples=3, seed=5)
    assert [[c.token_ids for c in cs] for cs in one] == [[c.token_ids for c in cs] for cs in two]
    assert [[c.token_ids for c in cs] for cs in one] != [[c.token_ids for c in cs] for cs in other]
    assert all(len(cs) == 3 and all(isinstance(c.text, str) for c in cs) for cs in one)


def test_prompt_seeds_make_samples_independent_of_batch_position(llama, tokenizer):
    model, _ = llama
    sampler = Sampler(model, tokenizer, max_len=64)
    kw = dict(max_new_tokens=8, temperature=1.0, num_samples=2, seed=4)
    both = sampler.generate(["Question: Tom has 3 apples.", "Answer:"], prompt_seeds=[11, 22], **kw)
    alone = sampler.generate(["Answer:"], prompt_seeds=[22], **kw)
    assert [c.token_ids for c in both[1]] == [c.token_ids for c in alone[0]]
    with pytest.raises(ValueError, match="prompt_seeds"):
        sampler.generate(["Answer:"], prompt_seeds=[1, 2], **kw)


def test_unpadded_small_batches_give_the_same_samples(llama, tokenizer):
    """min_rows=1 (no padding of a one-prompt call to 8 rows) changes the device shapes, not the output."""
    model, _ = llama
    kw = dict(max_new_tokens=8, temperature=1.0, num_samples=1, seed=4)
    padded = Sampler(model, tokenizer, max_len=64)
    unpadded = Sampler(model, tokenizer, max_len=64, min_rows=1)
    one = padded.generate(["Question: Tom has 3 apples."], **kw)
    two = unpadded.generate(["Question: Tom has 3 apples."], **kw)
    assert [c.token_ids for c in one[0]] == [c.token_ids for c in two[0]]
    np.testing.assert_allclose(one[0][0].logprobs, two[0][0].logprobs, atol=1e-5)


@pytest.mark.parametrize("chunk_slots", [-1, 16])
def test_sharded_sampler_equals_single_device(tmp_path, tokenizer, chunk_slots):
    path, _ = _save_tiny_hf(tmp_path, "llama", seed=3)
    prompts = _prompts(5, seed=2)
    single_model, _ = load_hf_checkpoint(path)
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    sharded_model, _ = load_hf_checkpoint(path, mesh=mesh)
    outs = []
    for model, m in ((single_model, None), (sharded_model, mesh)):
        sampler = Sampler(model, tokenizer, max_len=64, mesh=m, kv_chunk_slots=chunk_slots)
        reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=10, temperature=t, seed=i)
                for i, p in enumerate(prompts) for t in (0.0, 1.0)]
        outs.append(sampler.sample(reqs))
    assert len(jax.devices()) == 8
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_prefill_row_blocks_rule():
    assert engine.prefill_row_blocks(64, 128) == 4  # 16 x 128 = 2048 tokens a block
    assert engine.prefill_row_blocks(16, 128) == 1
    assert engine.prefill_row_blocks(1, 4096) == 1  # a row is never split
    assert engine.prefill_row_blocks(64, 4096) == 64
    assert engine.prefill_row_blocks(64, 4096, data_shards=2) == 32  # each block still spans both shards
    assert engine.prefill_row_blocks(24, 256) == 3  # a divisor of the rows


@pytest.mark.parametrize("sharded", [False, True])
def test_prefill_in_row_blocks_equals_one_pass(tmp_path, monkeypatch, sharded):
    """A large prefill runs as a loop over blocks of rows: the same logits and cache as one pass, on one
    device and with the rows sharded over a mesh; the sampler's greedy tokens are unchanged."""
    path, _ = _save_tiny_hf(tmp_path, "mistral", sliding_window=8, seed=5)
    mesh = make_mesh(data=2, fsdp=1, tensor=4) if sharded else None
    model, _ = load_hf_checkpoint(path, mesh=mesh)
    sampler = Sampler(model, None, max_len=48, mesh=mesh)
    prompts = _prompts(8, seed=7, lo=3, hi=20)
    chunk_bs = np.zeros((8, 24), np.int32)
    pos_bs = np.full((8, 24), -1, np.int32)
    for i, p in enumerate(prompts):
        chunk_bs[i, :len(p)], pos_bs[i, :len(p)] = p, np.arange(len(p))
    outs = []
    for blocks in (1, 4):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            cache = sampler._new_cache(8, 48)
            outs.append(engine.prefill(sampler.graphdef, sampler.params, cache, sampler._put(chunk_bs),
                                       sampler._put(pos_bs), blocks))
    (logits_one, cache_one), (logits_blocks, cache_blocks) = outs
    np.testing.assert_allclose(np.asarray(logits_blocks), np.asarray(logits_one), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache_blocks.slot_pos_bt), np.asarray(cache_one.slot_pos_bt))
    for a, b in zip(jax.tree.leaves(cache_blocks), jax.tree.leaves(cache_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    if sharded:
        assert cache_blocks.k[0][0].sharding.is_equivalent_to(cache_one.k[0][0].sharding, 4)

    def greedy(block_tokens):
        monkeypatch.setattr(engine, "PREFILL_BLOCK_TOKENS", block_tokens)
        reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=6, temperature=0.0) for p in prompts]
        return [c.token_ids for c in sampler.sample(reqs, keep_states=False)]

    assert greedy(16) == greedy(2048)  # a row a block (two, with the mesh's 2 data shards) vs one pass


def test_generate_cli_reads_escapes_in_stop_strings_and_keeps_other_text_as_typed():
    from alphallm_jax.commands.generate import unescape

    assert unescape(r"\n") == "\n" and unescape(r"\n\nQuestion:") == "\n\nQuestion:" and unescape(r"a\tb") == "a\tb"
    assert unescape(r"\\n") == "\\n"  # an escaped backslash stays a backslash
    assert unescape("Réponse :") == "Réponse :" and unescape("答案\\n") == "答案\n"  # non-ASCII as typed


def test_generate_cli_on_a_mesh_prints_what_one_device_prints(tmp_path):
    """`alphallm generate --mesh=4,1,2` (8 simulated devices: the batch over data, heads over tensor) prints
    the single-device greedy completions; a malformed --mesh names the flag and the expected form."""
    import subprocess
    import sys

    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from tests.helpers import REPO_ROOT, subprocess_env
    from tests.tiny_lm import arith_tokenizer, steered_policy

    tokenizer = arith_tokenizer(tmp_path)
    policy = steered_policy(tokenizer)
    save_hf_checkpoint(policy, policy.cfg, tmp_path / "policy", tokenizer=tokenizer)
    env = subprocess_env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    def generate(*extra):
        args = [sys.executable, "-m", "alphallm_jax.cli", "generate", f"--checkpoint={tmp_path / 'policy'}",
                "--prompt=Question: Tom has 3 apples.", "--prompt=Question: Ann has 9 pens and 2 cups.",
                "--prompt=Q", "--max_new_tokens=12", *extra]
        return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    one, sharded = generate(), generate("--mesh=4,1,2")
    assert one.returncode == 0 and sharded.returncode == 0, (one.stderr[-2000:], sharded.stderr[-2000:])
    assert one.stdout.count("--- [") == 3 and sharded.stdout == one.stdout
    bad = generate("--mesh=4x2")
    assert bad.returncode != 0 and "--mesh: mesh '4x2': expected three comma-separated integers" in bad.stderr
    too_many = generate("--mesh=4,1,4")
    assert too_many.returncode != 0 and "--mesh: mesh data*fsdp*tensor = 4*1*4 != 8 devices" in too_many.stderr
