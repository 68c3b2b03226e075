"""Edge cases of the sampler's inputs and texts: a str as `stop` or `prompts`, the token texts the stop
automaton reads (sentencepiece vocabularies as tokenizer.model and as tokenizer.json, control tokens),
an empty prompt's first space, a model vocabulary padded past the tokenizer's, out-of-range seeds and
top-k. The policies are random decoders whose logits a fixed per-id bias dominates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from alphallm_jax.models import ModelConfig
from alphallm_jax.models.tokenizer import Tokenizer
from alphallm_jax.sampling import Sampler, SampleRequest
from alphallm_jax.sampling.token_texts import plain_anchor, token_bytes, token_texts
from tests.helpers import MISTRAL_TOKENIZER, require_shared_data
from tests.tiny_lm import BiasedDecoder

VOCAB = 32000  # the Mistral sentencepiece vocabulary
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    require_shared_data()
    return Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """The Mistral vocabulary as a tokenizer.json (no tokenizer.model) with the Llama/Mistral fast
    decoder, whose `Strip` drops the first space of what it decodes."""
    require_shared_data()
    import sentencepiece as spm
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL_TOKENIZER))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    hf = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(path))
    return Tokenizer.from_dir(path)


def _policy(bias_by_id: dict[int, float], *, vocab: int = VOCAB, base: float = -30.0) -> BiasedDecoder:
    """A random decoder whose logits are `bias_by_id` (every other id: `base`) plus a small random part."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    bias_v = np.full(vocab, base, np.float32)
    for i, b in bias_by_id.items():
        bias_v[i] = b
    return BiasedDecoder(cfg, bias_v, rngs=nnx.Rngs(0))


def _the(tokenizer) -> int:
    (the,) = tokenizer.encode("the")  # the piece "\u2581the"
    return the


# ------------------------------------------------------------------------------------ str arguments


def test_a_str_stop_is_one_stop_string_not_its_characters(tokenizer):
    the = _the(tokenizer)
    sampler = Sampler(_policy({the: 30.0}), tokenizer, max_len=64)  # writes " the the the ..."
    stop = "\n\nQuestion:"  # holds "t", "e" and " ", which " the" does too
    (c,) = sampler.generate(["Say"], max_new_tokens=6, temperature=0.0, stop=stop)[0]
    assert (c.finish_reason, c.token_ids) == ("length", [the] * 6)
    req = SampleRequest(state=sampler.new_state("Say"), max_new_tokens=6, temperature=0.0, stop=stop)
    assert req.stop == (stop,)
    (c,) = sampler.sample([req], keep_states=False)
    assert (c.finish_reason, c.token_ids) == ("length", [the] * 6)
    (c,) = sampler.generate(["Say"], max_new_tokens=6, temperature=0.0, stop="the the")[0]
    assert (c.finish_reason, c.stop_string, c.text) == ("stop", "the the", " the the")


def test_generate_refuses_a_str_of_prompts(tokenizer):
    sampler = Sampler(_policy({}), tokenizer, max_len=64)
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        sampler.generate("Hi!", max_new_tokens=3)


# ------------------------------------------------------------------------------------ token texts


def test_token_texts_of_a_tokenizer_json_keep_word_boundary_spaces(tokenizer, hf_tokenizer):
    the = _the(tokenizer)
    from_json, from_model = token_texts(hf_tokenizer, VOCAB), token_texts(tokenizer, VOCAB)
    assert from_json[the] == from_model[the] == " the"
    # The same vocabulary gives the same texts either way; only <unk> differs: the HF tokenizer skips
    # it as a special token, sentencepiece decodes it to " \u2047 ".
    assert [i for i in range(VOCAB) if from_json[i] != from_model[i]] == [0]
    assert (from_json[0], from_model[0]) == ("", tokenizer.decode([0]))


def test_a_stop_with_a_space_stops_a_tokenizer_json_sampler(tokenizer, hf_tokenizer):
    sampler = Sampler(_policy({_the(tokenizer): 30.0}), hf_tokenizer, max_len=64)
    (c,) = sampler.generate(["Say"], max_new_tokens=6, temperature=0.0, stop=[" the"])[0]
    assert (c.finish_reason, c.stop_string, c.text) == ("stop", " the", " the")
    (c,) = sampler.generate(["Say"], max_new_tokens=6, temperature=0.0, stop=["thethe"])[0]
    assert c.finish_reason == "length"  # " the the ..." never holds "thethe"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_texts_concatenate_to_the_decoded_text(tokenizer, seed):
    """Every token's text, control tokens and <unk> included, is what it adds to the decoded text (byte
    pieces of non-ASCII characters left out: they decode together, not one by one)."""
    texts = token_texts(tokenizer, VOCAB)
    rng = np.random.default_rng(seed)
    ascii_bytes = [tokenizer.encode("a\nb")[1], tokenizer.encode("a\tb")[1]]  # <0x0A>, <0x09>
    ids = rng.permutation([0, BOS, EOS, *ascii_bytes, *rng.integers(259, VOCAB, size=35)]).tolist()
    anchor = plain_anchor(tokenizer)
    assert tokenizer.decode([anchor] + ids) == tokenizer.decode([anchor]) + "".join(texts[i] for i in ids)


def test_control_tokens_never_complete_a_stop(tokenizer):
    sampler = Sampler(_policy({BOS: 30.0}), tokenizer, max_len=64)  # writes only <s>, which decodes to ""
    (c,) = sampler.generate(["Hi"], max_new_tokens=8, temperature=0.0, stop=[">", "s"])[0]
    assert (c.finish_reason, c.text, c.token_ids) == ("length", "", [BOS] * 8)


def test_an_empty_prompts_text_keeps_the_first_tokens_space(tokenizer):
    """The stop automaton sees the first token's word-boundary space after an empty prompt; the text
    keeps it too, so the stop string is in the text."""
    sampler = Sampler(_policy({_the(tokenizer): 30.0}), tokenizer, max_len=64)
    (c,) = sampler.generate([""], max_new_tokens=4, temperature=0.0, stop=[" the"])[0]
    assert (c.finish_reason, c.stop_string, c.text) == ("stop", " the", " the")
    (c,) = sampler.generate([""], max_new_tokens=2, temperature=0.0)[0]
    assert c.text == " the the"


def test_the_text_runs_to_the_end_of_the_token_that_completed_the_stop(tokenizer):
    (and_,) = tokenizer.encode("and")
    sampler = Sampler(_policy({and_: 30.0}), tokenizer, max_len=64)
    (c,) = sampler.generate(["Question"], max_new_tokens=4, temperature=0.0, stop=["an"])[0]
    assert (c.finish_reason, c.stop_string, c.token_ids, c.text) == ("stop", "an", [and_], " and")


def test_a_stop_that_begins_in_the_continued_text_ends_the_sample_where_it_completes(tokenizer):
    # A step ends in its newline: a sample whose first token is another newline writes a blank line ("\n\n"),
    # which ends the solution there, as `context_stops` asks; other stops are matched within the sample.
    newline = tokenizer.encode("x\n")[-1]
    assert tokenizer.id_to_piece(newline) == "<0x0A>"
    sampler = Sampler(_policy({newline: 30.0}), tokenizer, max_len=64)
    state = sampler.new_state("Question: 2+2?\nAnswer:\n2+2=4\n")

    def sample(**kw):
        (c,) = sampler.sample([SampleRequest(state=state, max_new_tokens=6, temperature=0.0, stop=("\n\n", "\nQ"),
                                             **kw)])
        return c.finish_reason, c.stop_string, len(c.token_ids), c.text

    assert sample() == ("stop", "\n\n", 2, "\n\n")
    assert sample(stop_context="2+2=4\n", context_stops=("\n\n",)) == ("stop", "\n\n", 1, "\n")
    assert sample(stop_context="2+2=4\n", context_stops=("\nQ",)) == ("stop", "\n\n", 2, "\n\n")
    assert sample(stop_context="2+2=4", context_stops=("\n\n",)) == ("stop", "\n\n", 2, "\n\n")


def test_the_stop_that_ended_a_sample_may_begin_in_its_context():
    from alphallm_jax.sampling.stop_rules import StopTables, ending_stop

    stops = [b"\n\n", b"\nQuestion:"]
    assert ending_stop(b"Question: x\n\n", stops, context=b"a\n") == b"\nQuestion:"
    assert ending_stop(b"Question: x\n\n", stops, context=b"a\n", within=[b"\nQuestion:"]) == b"\n\n"
    assert ending_stop(b"x\n", stops, context=b"a\n\n") is None  # an earlier blank line ended nothing here
    tables = StopTables(("\n\n", "\nQuestion:"), (b"\n", b"Q", b"x"))
    assert tables.initial_state("\n\n", b"a\n") == 1 and tables.initial_state("\nQuestion:", b"\nQues") == 5
    assert tables.initial_state("\n\n", b"") == tables.initial_state("\n\n", b"a\n\nb") == 0


def test_a_request_past_max_len_is_refused_before_anything_runs_or_is_counted(tokenizer):
    sampler = Sampler(_policy({}), tokenizer, max_len=32, max_batch=1)
    ok = SampleRequest(state=sampler.new_state("Question"), max_new_tokens=4)
    too_long = SampleRequest(state=sampler.new_state("Question " * 40), max_new_tokens=8)
    before = dataclasses.asdict(sampler.stats)
    with pytest.raises(ValueError, match=r"request needs \d+ tokens .* at most 32"):
        sampler.sample([ok, too_long])  # two batches of one: the first ran before the second was checked
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        sampler.sample([ok, dataclasses.replace(ok, max_new_tokens=0)])
    assert dataclasses.asdict(sampler.stats) == before


# ------------------------------------------------------------------------------------ byte tokens

QED = "\u220e"  # "∎": three byte pieces in the Mistral vocabulary, no piece of its own


def _qed_bytes(tokenizer) -> list[int]:
    ids = tokenizer.encode("x" + QED)[1:]
    assert [tokenizer.id_to_piece(i) for i in ids] == ["<0xE2>", "<0x88>", "<0x8E>"]
    return ids


@pytest.mark.parametrize("which", ["model", "json"])
def test_token_bytes_concatenate_to_the_utf8_of_the_decoded_text(tokenizer, hf_tokenizer, which):
    tok = tokenizer if which == "model" else hf_tokenizer
    data = token_bytes(tok, VOCAB)
    ids = tok.encode("x \u220e = 3\u00b7y\n\u220e\u220e \u7b54 \U0001f600 end")
    anchor = plain_anchor(tok)
    assert tok.decode([anchor] + ids).encode() == tok.decode([anchor]).encode() + b"".join(data[i] for i in ids)
    assert [data[i] for i in _qed_bytes(tokenizer)] == [b"\xe2", b"\x88", b"\x8e"]


def test_a_stop_spelled_in_byte_pieces_ends_the_row_where_it_completes(tokenizer):
    """A policy writing the three byte pieces of "∎" in random order stops after the first run of all
    three in order, not at the length cap (matched on characters, a byte piece's text is U+FFFD)."""
    qed = _qed_bytes(tokenizer)
    sampler = Sampler(_policy({i: 30.0 for i in qed}), tokenizer, max_len=128)
    (c,) = sampler.generate(["Proof"], max_new_tokens=96, temperature=1.0, stop=[QED, "\n"], seed=3)[0]
    first = next(k for k in range(len(c.token_ids)) if c.token_ids[k - 2:k + 1] == qed)
    assert first > 2  # the seed writes other byte runs first
    assert (c.finish_reason, c.stop_string, len(c.token_ids)) == ("stop", QED, first + 1)
    assert c.text.endswith(QED)


def test_token_bytes_of_a_byte_level_bpe_vocabulary(tmp_path):
    """A byte-level BPE tokenizer.json (GPT-2's byte alphabet, as Llama-3's): a token holding part of a
    character stands for its bytes."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"])
    hf.train_from_iterator([f"so x = {n} \u220e done" for n in range(40)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_dir(tmp_path)
    data = token_bytes(tok, tok.vocab_size)
    ids = tok.encode("x \u220e\u00e9 y")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(data[i] for i in ids) == "x \u220e\u00e9 y".encode()


# ------------------------------------------------------------------------------------ padded vocabulary


def test_a_padded_vocabulary_never_samples_past_the_tokenizer(tokenizer):
    the, padded = _the(tokenizer), VOCAB + 10
    model = _policy({padded: 30.0, the: 25.0}, vocab=VOCAB + 64, base=0.0)
    sampler = Sampler(model, tokenizer, max_len=64)
    (c,) = sampler.generate(["Say"], max_new_tokens=3, temperature=0.0)[0]
    assert (c.token_ids, c.text) == ([the] * 3, " the the the")
    samples = sampler.generate(["Say"], max_new_tokens=8, temperature=3.0, num_samples=16, seed=1)[0]
    assert max(t for s in samples for t in s.token_ids) < VOCAB
    # Log-probabilities are over the ids the tokenizer has.
    prompt = list(sampler.new_state("Say").tokens)
    logits_v = np.asarray(model(np.array([prompt], np.int32))[0, -1], np.float64)[:VOCAB]
    logp_v = logits_v - logits_v.max() - np.log(np.exp(logits_v - logits_v.max()).sum())
    assert c.logprobs[0] == pytest.approx(logp_v[the], abs=2e-4)


def test_decode_after_skips_ids_the_tokenizer_lacks(tokenizer):
    the = _the(tokenizer)
    sampler = Sampler(_policy({}, vocab=VOCAB + 64), tokenizer, max_len=64)
    assert sampler.decode_after([BOS, the], [VOCAB + 10, the, VOCAB + 63]) == " the"
    assert sampler.decode_after([BOS, VOCAB + 5], [the]) == " the"


# ------------------------------------------------------------------------------------ seeds and top-k


def test_generate_refuses_negative_seeds_naming_the_argument(tokenizer):
    sampler = Sampler(_policy({}), tokenizer, max_len=64)
    with pytest.raises(ValueError, match="^seed"):
        sampler.generate(["a"], max_new_tokens=2, seed=-1)
    with pytest.raises(ValueError, match="^prompt_seeds"):
        sampler.generate(["a"], max_new_tokens=2, prompt_seeds=[-3])


def test_request_seeds_are_taken_modulo_2_to_the_32(tokenizer):
    sampler = Sampler(_policy({}, base=0.0), tokenizer, max_len=64)  # near-uniform: seeds differ
    root = sampler.new_state("a")

    def tokens(seeds):
        reqs = [SampleRequest(state=root, max_new_tokens=4, temperature=1.0, seed=s) for s in seeds]
        return [c.token_ids for c in sampler.sample(reqs, keep_states=False)]

    assert tokens([-1, 2**32 + 5, 2**40]) == tokens([2**32 - 1, 5, 0])
    assert tokens([5]) != tokens([6])


def test_a_top_k_past_the_vocabulary_keeps_it_all(tokenizer):
    sampler = Sampler(_policy({}, base=0.0), tokenizer, max_len=64)
    kw = dict(max_new_tokens=4, temperature=1.0, num_samples=4, seed=3)
    whole = sampler.generate(["a"], **kw)[0]
    for top_k in (2**31, 2**40):
        assert [c.token_ids for c in sampler.generate(["a"], top_k=top_k, **kw)[0]] == [c.token_ids for c in whole]
