"""Imagination: the filters on hand-written cases, the near-duplicate index against brute force, and whole
syntheses (a scripted sampler with known outcomes; a tiny random model) whose counts add up and resume."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from alphallm_jax.config import default_config
from alphallm_jax.data.arith import generate_problems
from alphallm_jax.data.problems import Problem
from alphallm_jax.sampling.sampler import Completion
from alphallm_jax.synthesis import SynthesisSettings, require_prompts, summary_line, synthesize
from alphallm_jax.synthesis.form import FormRules, form_problem
from alphallm_jax.synthesis.near_duplicates import NearDuplicateIndex, jaccard, lsh_band_shape, shingles
from alphallm_jax.synthesis.prompting import (
    fewshot_prompt,
    opening,
    plan_round,
    prefix_request,
    question_text,
    renumber,
    split_counts,
    stated_numbers,
)
from alphallm_jax.synthesis.synthesize import DROP_REASONS

SEED_Q = "Tom has 6 apples. He buys 4 more apples. How many apples does Tom have now?"
TEST_Q = "Mia has 12 pens. She gives 5 pens to Leo. How many pens does Mia have left?"


def _problem(pid: str, question: str, split: str = "train") -> Problem:
    return Problem(id=pid, question=question, answer="1", solution="1+0=<<1+0=1>>1\n#### 1", task="arith",
                   meta={"split": split})


# ------------------------------------------------------------------------------------------ form


@pytest.mark.parametrize("text,reason", [
    ("Sam has 3 cats. How many cats does Sam have now?", None),
    ("Sam has 3 cats and 4 dogs at home.", "no_question"),
    ("Sam has 3 cats. How many?", "no_question"),  # the asking sentence is too short to be a question
    ("How many?", "too_short"),
    ("Sam has 3 cats. He gets 2 more. How many cats? #### 5", "answer_leak"),
    ("Sam has 3 cats, so 3+2=<<3+2=5>>5. How many cats does he have?", "answer_leak"),
    ("Sam has cats. He gets more cats. How many cats does Sam have now?", "no_number"),
    ("Sam has 3 cats and the cats and the cats and the cats and the cats. How many cats are there?",
     "degenerate"),
    ("Sam has 3 cats. " * 50 + "How many cats does Sam have?", "too_long"),
    ("Sam has 3 cats. He gets 2 more cats in all?", "no_question"),  # no interrogative word
    ("Sam has 3 cats. He gets 2 dogs. Calculate the number of pets Sam has.", None),
    ("Sam has 3 cats. How many cats are there? How many dogs does Sam have?", "several_questions"),
    ("Sam has three cats and twice as many dogs. How many dogs does Sam have?", None),  # numbers in words
    ("Sam has 3 cats. He gets 2 more cats. How many apples does Sam have now?", "ungrounded"),
    ("Sam has 3 cats. He gets 2 more cats. How many cats does Lily have now?", "ungrounded"),
    # A title does not end a sentence; an instruction may follow a clause.
    ("A ticket costs $40. Mr. Benson buys 12 tickets. How much did Mr. Benson pay in all?", None),
    ("Sam works 50 hours and earns $20 an hour. If he gets $5 more, calculate his total income.", None),
    ("Sam has 3 cats and 2 dogs. If he gets 2 more cats, then calculate the number of pets?", None),
    ("Sam has 3 cats and 2 dogs. If he gets 2 more cats, the pets are many.", "no_question"),
    # Notes after the question: a parenthesis, a stated fact or assumption, how to write the answer; a
    # note that asks is none (nor does it end a question), any other sentence after the question leaves
    # it unasked.
    ("Sam has 3 cats. How many legs do they have? (A cat has 4 legs.)", None),
    ("Sam drinks 500 ml a day. How many days does a 2-liter bottle last? There are 1,000 ml in 1 liter.", None),
    ("Sam earned 5 fewer dollars than Eve. Together they earned $37. How many dollars did Sam earn? "
     "Use E to represent Eve's earnings.", None),
    ("Sam has 3 cats. How many cats are there? (How many dogs does Sam have?)", "no_question"),
    ("Sam has 3 cats. How many cats does Sam have? Sam has 2 dogs.", "no_question"),
    # ... nor one that answers, instructs, is cut off or is no sentence.
    ("Sam has 3 cats. How many cats does Sam have? (The answer is 3.)", "no_question"),
    ("Sam has 3 cats and 2 dogs. How many cats does Sam have? Use that to find how many dogs Sam has.",
     "no_question"),
    ("Sam has 3 cats and 2 dogs. How many cats does Sam have? (Then calculate the dogs.)", "no_question"),
    ("Sam has 3 cats. How many cats does Sam have? (", "no_question"),
    ("Sam has 3 cats. How many cats does Sam have? There is", "no_question"),
    ("Sam has 3 cats. How many cats does Sam have? (asdf qwer zxcv", "no_question"),
    # A sentence that reports a count asks nothing; one that opens a clause with it asks.
    ("Sam has 30 cats. He counts how many cats are left and sells half. How many cats does Sam have now?", None),
    ("Sam has 3 cats. If he sells one, how many cats are left. How many dogs does Sam have?", "several_questions"),
    ("Sam has 3 cats and 2 dogs. And how many dogs does Sam have. How many cats does he have?",
     "several_questions"),
    ("Sam has 3 cats and 2 dogs; how many dogs does Sam have. How many cats does he have?", "several_questions"),
    ("Sam has 3 cats and walked 2 miles, to find his lost dog.", "no_question"),  # "to" opens no question
    # Numbers in words, dotted acronyms and units, closing quotes, a clause opened by a preposition.
    ("Sam has eighteen cats and forty dogs. How many cats and dogs does Sam have?", None),
    ("The P.T.O. buys 12 shirts at $5 each. How much does the P.T.O. spend?", None),
    ("A house of 1,500 sq. ft. grows by 300 sq. ft. What is the size of the house now?", None),
    ("Sam's dog weighs 10 lbs. How many lbs does Sam's dog weigh in 2 years if it gains 3 lbs a year?", None),
    ("Sam drives 300 miles to the U.S. How many miles does Sam drive in 2 trips?", None),
    ('Sam spends 5 minutes on each of 3 steps. How long does it take Sam to do his "full routine?"', None),
    ("A tank 18 inches tall fills at 2 inches per hour. If it starts empty, at what time will it be full.", None),
    # Dollar signs of money delimit no math across sentences.
    ("A farm costs $3000 a month. Calculate its income if it sells 10 gallons at $3.55.", None),
])
def test_form_rules(text, reason):
    assert form_problem(text, FormRules(max_repeats=2)) == reason


def test_form_unknown_words_and_real_questions():
    from alphallm_jax.synthesis.form import vocabulary

    known = vocabulary(["Sam has 3 cats. He gets 2 more cats. How many cats does Sam have now?"])
    rules = FormRules(max_unknown_words=0.0)
    assert form_problem("Sam has 3 cats. He gets 2 more cats. How many cats does Sam have now?", rules,
                        known_words=known) is None
    assert form_problem("Sam has 3 catz. He gets 2 more cats. How many cats does Sam have now?", rules,
                        known_words=known) in ("unknown_words", "ungrounded")
    # Every question of the arith task's own splits is well formed (apart from rare long repeats).
    questions = [p.question for p in generate_problems(n=300, seed=4, split="x")]
    assert sum(form_problem(q, FormRules()) is not None for q in questions) <= 3


def test_form_large_numbers_against_d0s_quantile():
    from alphallm_jax.synthesis.form import number_limit

    d0_numbers = [2] * 50 + [5] * 30 + [10] * 17 + [40, 60, 75]  # 97% of D0's numbers are at most 10
    rules = FormRules(max_number_quantile=0.97)
    assert number_limit(d0_numbers, rules) == 40 and number_limit(d0_numbers, FormRules(max_number_quantile=0.9)) == 10
    assert number_limit(d0_numbers, FormRules()) is None and number_limit([], rules) is None
    limit = number_limit(d0_numbers, FormRules(max_number_quantile=0.9))
    q = "Sam has {} cats. He gets 2 more cats. How many cats does Sam have now?"
    assert form_problem(q.format(10), rules, max_number=limit) is None
    assert form_problem(q.format(11), rules, max_number=limit) == "large_number"
    assert form_problem(q.format("1.5"), rules, max_number=limit) is None  # a decimal's digits are no number
    # ... but its value counts, as a grouped number's does (the integer pattern read `12.5` as 1 and
    # `90,000` as 9, both under the limit).
    assert form_problem(q.format("12.5"), rules, max_number=limit) == "large_number"
    assert form_problem(q.format("90,000"), rules, max_number=limit) == "large_number"
    from alphallm_jax.synthesis.form import INTEGER
    from alphallm_jax.synthesis.prompting import renumber

    assert [m.group() for m in INTEGER.finditer("12.5 kg, 10,000 and 3, 4")] == ["3", "4"]
    assert renumber("A shirt costs $12.50 and a hat $40,000.", random.Random(0), [7]) == \
        "A shirt costs $12.50 and a hat $40,000."  # decimals and grouped numbers are left alone
    assert form_problem(q.format(11), rules) is None  # no limit given


def test_form_truncated_and_math_rules():
    assert form_problem("Sam has 3 cats. How many cats does Sam have now?", FormRules(), truncated=True) == "truncated"
    math_rules = FormRules(require_question_mark=False, require_number=False)
    assert form_problem("Find the value of $x$ such that $x^2 = y$ for every real $y$.", math_rules) is None
    # A period inside math ends no sentence: the question is the whole last sentence.
    assert form_problem("Let $p(x) = x^2 + 3$ for all real $x$. Find the value of $p(8).$", FormRules()) is None


def test_paper_preset_form_rules_keep_the_real_questions():
    """The GSM8K and MATH presets' form rules accept nearly every real question of their task (a filter
    that drops real questions drops good imagined ones too)."""
    import json

    from tests.helpers import SHARED_DATA, load_config

    def kept(config, path, key, limit):
        rules = FormRules.from_config(load_config(config).synthesis.form)
        lines = (SHARED_DATA / path).read_text().splitlines()[:limit]
        return sum(form_problem(json.loads(x)[key], rules) is None for x in lines) / len(lines)

    # All but 6 of GSM8K's 7,473 train questions (2 end without punctuation, 2 ask indirectly: "He is
    # wondering what ...", 1 adds "Use E to represent how many ...", 1 repeats "100-meter" within 5
    # words), all but 1 of its 1,319 test questions.
    assert kept("llama2_7b_gsm8k", "gsm8k/train.jsonl", "question", None) >= 0.999
    assert kept("llama2_7b_gsm8k", "gsm8k/test.jsonl", "question", None) >= 0.999
    assert kept("llama3_8b_instruct_math", "math/math500_test.jsonl", "problem", 500) >= 0.99


# --------------------------------------------------------------------------------- near-duplicates


def test_near_duplicate_index_hand_cases():
    index = NearDuplicateIndex(0.8)
    index.add("d0-1", SEED_Q)
    assert index.find(SEED_Q) == ("d0-1", 1.0)
    assert index.find("  tom has 6 APPLES.  He buys 4 more apples. How many apples does Tom have now? ")[0] == "d0-1"
    one_number = SEED_Q.replace("4 more", "5 more")
    assert index.find(one_number)[0] == "d0-1"
    assert jaccard(shingles(one_number), shingles(SEED_Q)) >= 0.8
    assert index.find(TEST_Q) is None
    assert index.find("Lena bakes 30 cookies and sells 12 of them at the fair. How many cookies are left?") is None


def test_lsh_matches_brute_force_on_arith_questions():
    questions = [p.question for p in generate_problems(n=400, seed=3, split="x")]
    threshold = 0.7
    index = NearDuplicateIndex(threshold)
    brute_misses = found = 0
    for i, q in enumerate(questions):
        sh = shingles(q)
        brute = max((jaccard(sh, shingles(questions[j])) for j in range(i)), default=0.0)
        hit = index.find(q)
        if hit is not None:
            found += 1
            assert hit[1] >= threshold  # never a false positive: every candidate is checked exactly
        if brute >= threshold and hit is None:
            brute_misses += 1
        index.add(str(i), q)
    assert found > 20  # templated questions: many true near-duplicates to find
    assert brute_misses == 0


def test_band_shape_tracks_threshold_and_rarely_misses_a_pair_at_it():
    low_b, low_r = lsh_band_shape(0.5, 128)
    high_b, high_r = lsh_band_shape(0.9, 128)
    assert low_b * low_r <= 128 and high_b * high_r <= 128
    assert low_r < high_r  # a higher threshold allows longer bands (fewer candidates)
    for threshold in (0.6, 0.8, 0.85, 0.9):
        bands, rows = lsh_band_shape(threshold, 128)
        assert (1 - threshold ** rows) ** bands <= 1e-3
    assert lsh_band_shape(0.85, 128) == (18, 7)


def test_a_test_question_with_a_word_dropped_is_found():
    # Jaccard 0.875 against its source: the old band shape (11 x 11) missed such pairs 13% of the time.
    # Every one-word drop of 40 GSM8K-like questions, against a threshold of 0.85.
    import json

    from tests.helpers import require_shared_data

    require_shared_data()
    from alphallm_jax.data.loaders import resolve_data_dir

    rows = [json.loads(line) for line in (resolve_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:40]]
    index = NearDuplicateIndex(0.85)
    index.add_many((str(i), r["question"]) for i, r in enumerate(rows))
    pairs = missed = 0
    for r in rows:
        words = r["question"].split()
        for k in range(len(words)):
            variant = " ".join(words[:k] + words[k + 1:])
            if jaccard(shingles(variant), shingles(r["question"])) >= 0.85:
                pairs += 1
                missed += index.find(variant) is None
    assert pairs > 500 and missed <= pairs // 200


# ----------------------------------------------------------------------------------- prompting


def test_fewshot_prompt_has_seed_last_and_open_question():
    settings = SynthesisSettings(instruction="Write a new question with {variation}.", num_exemplars=3)
    seeds = [_problem(f"s{i}", f"Question number {i} has {i} apples. How many apples?") for i in range(5)]
    prompt = fewshot_prompt(seeds[0], seeds[1:3], settings, "new numbers")
    assert prompt.startswith("Write a new question with new numbers.\n\nQuestion: Question number 1")
    assert prompt.endswith(f"Question: {seeds[0].question}\n\nQuestion:")
    counts = {"fewshot": 7, "unconditional": 2}
    requests = plan_round(seeds, counts, settings, round_index=0, seed_offset=0)
    assert [r.method for r in requests] == ["fewshot"] * 7 + ["unconditional"] * 2
    assert all(r.seed_ids[0] not in r.exemplar_ids and len(r.exemplar_ids) == 2 for r in requests[:7])
    assert len({r.seed_ids for r in requests[:5]}) == 5  # seeds cycle through D0 before repeating
    assert requests == plan_round(seeds, counts, settings, round_index=0, seed_offset=0)
    short = plan_round(seeds, {"fewshot": 3}, settings, round_index=0, seed_offset=0,
                       fits=lambda p: p.count("Question:") <= 2)
    assert all(len(r.exemplar_ids) == 0 for r in short)  # exemplars dropped until the prompt fits
    assert question_text(" Sam has 3 cats. How many?\n", "\n") == "Sam has 3 cats. How many?"
    assert split_counts(10, SynthesisSettings(method="fewshot,prefix,unconditional")) == {
        "fewshot": 4, "prefix": 3, "unconditional": 3}
    with pytest.raises(ValueError, match="synthesis.method"):
        SynthesisSettings(method="fewshot,imagine")


def test_prefix_variation_keeps_the_opening_with_new_numbers():
    import random

    seed = _problem("s0", "Tom has 6 cupcakes for a party. He gives 2 cupcakes to each of 2 neighbors. How many "
                          "cupcakes does Tom have now?")
    assert opening(seed.question, 1) == "Tom has 6 cupcakes for a party."
    assert opening(seed.question, 5) == "Tom has 6 cupcakes for a party. He gives 2 cupcakes to each of 2 neighbors."
    assert renumber("Tom has 6 cupcakes and 2.5 kg of flour.", random.Random(0)).endswith("2.5 kg of flour.")
    request = prefix_request(seed, SynthesisSettings(method="prefix"), random.Random(1))
    assert request.prompt == "Question: " + request.question_prefix
    assert request.question_prefix.startswith("Tom has ") and request.question_prefix.endswith(" cupcakes for a party.")
    assert question_text(" He eats 2. How many are left?\n", "\n", request.question_prefix) == (
        request.question_prefix + " He eats 2. How many are left?")


def test_renumber_draws_d0s_own_numbers_within_half_to_twice():
    pool = stated_numbers([_problem("a", "Tom has 4 pens and 4 cups. The box holds 7 pens and 50 cups."),
                           _problem("b", "Mia has 9 dogs. She walks 100 km.")])
    assert pool == [4, 4, 7, 9, 50, 100]
    rng = random.Random(0)
    drawn = [int(renumber("Sam has 8 hats.", rng, pool).split()[2]) for _ in range(400)]
    assert set(drawn) == {4, 7, 9}  # D0's numbers in [4, 16]; 50 and 100 are out of range
    assert 0.3 < drawn.count(4) / len(drawn) < 0.7  # stated twice, drawn about half the time
    # Nothing of the pool in range: uniform in [v/2, 2v], as with no pool.
    wide = {int(renumber("Sam has 300 hats.", rng, pool).split()[2]) for _ in range(300)}
    assert wide <= set(range(150, 601)) and len(wide) > 100
    with pytest.raises(ValueError, match="renumber_draw"):
        SynthesisSettings(renumber_draw="gaussian")
    # plan_round hands the seeds' numbers to the prefix method.
    seeds = [_problem(f"s{i}", "Tom has 6 apples. He buys 4 more apples. How many apples does Tom have now?")
             for i in range(20)]
    requests = plan_round(seeds, {"prefix": 20}, SynthesisSettings(method="prefix", prefix_sentences=2),
                          round_index=0, seed_offset=0)
    assert {int(n) for r in requests for n in re.findall(r"\d+", r.question_prefix)} <= {4, 6}


def test_base_training_with_the_question_loss_puts_it_on_the_question(tmp_path):
    # What imagination needs of a base trained from scratch: `Question: -> a question -> Answer: ...`.
    from alphallm_jax.data.prompts import plain_prompt
    from alphallm_jax.pipeline.base_policy import sft_examples
    from tests.tiny_lm import arith_tokenizer

    tok = arith_tokenizer(tmp_path)
    problems = generate_problems(n=3, seed=1, split="x")
    plain = sft_examples(problems, tok, lambda p: plain_prompt(p.question))
    for ex, without, p in zip(sft_examples(problems, tok, lambda p: plain_prompt(p.question), question_loss=True),
                              plain, problems, strict=True):
        assert tok.decode(list(ex.prompt_ids)).strip() == "Question:"
        assert tok.decode(list(ex.response_ids)).strip().startswith(f"{p.question}\nAnswer:")
        assert ex.prompt_ids + ex.response_ids == without.prompt_ids + without.response_ids


# --------------------------------------------------------------------------- whole synthesis


class ScriptedSampler:
    """Returns scripted question texts in order (a stand-in for `Sampler.generate`)."""

    max_len = 10_000

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = 0

    class tokenizer:  # noqa: N801 - mimics the attribute
        @staticmethod
        def encode(text, add_bos=False):
            return text.split()

    def generate(self, prompts, *, max_new_tokens, num_samples=1, seed=0, **kw):
        self.calls += 1
        out = []
        for _ in prompts:
            row = []
            for _ in range(num_samples):
                text = self.texts.pop(0)
                row.append(Completion(text=text, token_ids=[], logprobs=[],
                                      finish_reason="length" if text.endswith("...") else "stop", stop_string="\n"))
            out.append(row)
        return out


def _scripted_case():
    seeds = [_problem("d0-0", SEED_Q), _problem("d0-1", "Ava reads 7 pages each day for 3 days. How many pages?")]
    tests = {"arith:test": [_problem("t-0", TEST_Q, "test")]}
    texts = [
        " " + SEED_Q + "\n",  # near_duplicate_d0
        " " + TEST_Q.replace("pens", "pens ") + "\n",  # test_overlap (whitespace does not hide it)
        " Nia has 14 shells. She finds 9 more shells on the beach. How many shells does Nia have now?\n",  # kept
        " Nia has 14 shells. She finds 9 more shells on the beach. How many shells does Nia have now?\n",  # dup
        " Omar bakes 25 muffins and sells 11 of them. How many muffins does Omar have left?\n",  # kept
        " #### 12\n",  # too_short
        " Omar bakes 25 muffins and sells 11 of them. He then bakes...",  # truncated
        " A farmer has 40 cows and 12 goats on his farm. How many goats and cows are on the farm?\n",  # kept
        " Kai has 3 kites. How many kites do 8 friends of Kai own if each has 2 kites?\n",  # surplus
    ]
    return seeds, tests, texts


def test_synthesis_counts_and_artifacts(tmp_path):
    seeds, tests, texts = _scripted_case()
    settings = SynthesisSettings(num_prompts=3, oversample=3.0, max_rounds=1, num_exemplars=2)
    sampler = ScriptedSampler(texts)
    result = synthesize(sampler, seeds, settings, tmp_path / "syn", test_questions=tests, progress=False)
    c = result.counts
    assert c["generated"] == 9 and c["kept"] == 3
    assert c["generated"] == c["kept"] + sum(c["dropped"].values())
    expected = dict.fromkeys(DROP_REASONS, 0) | {"near_duplicate_d0": 1, "test_overlap": 1, "too_short": 1,
                                                 "truncated": 1, "near_duplicate_synthetic": 1, "surplus": 1}
    assert c["dropped"] == expected
    assert c["test_overlap_by_split"] == {"arith:test": 1}
    assert [p["id"] for p in result.prompts] == ["syn-00000", "syn-00001", "syn-00002"]
    assert result.prompts[0]["question"].startswith("Nia has 14 shells")
    assert result.prompts[0]["method"] == "fewshot" and len(result.prompts[0]["seed_ids"]) == 1
    out = tmp_path / "syn"
    assert (out / "DONE").exists()
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "counts.json").read_text()) == c
    assert {r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())} == {
        k for k, v in expected.items() if v}
    problems = result.problems("arith")
    assert problems[0].answer == "" and problems[0].solution is None
    assert "kept 3 of 9" in summary_line(c)
    require_prompts(c, out)  # some kept: no error
    # Finished: loaded, the sampler is not called again; other settings in the same directory are refused.
    again = synthesize(ScriptedSampler([]), seeds, settings, out, test_questions=tests, progress=False)
    assert again.prompts == result.prompts and again.counts == c
    with pytest.raises(ValueError, match="other settings"):
        synthesize(ScriptedSampler([]), seeds, dataclasses.replace(settings, num_prompts=4), out,
                   test_questions=tests, progress=False)


def test_previous_iterations_are_deduplicated(tmp_path):
    seeds, tests, texts = _scripted_case()
    settings = SynthesisSettings(num_prompts=3, oversample=3.0, max_rounds=1)
    previous = [("syn1-00000", texts[4].strip())]
    result = synthesize(ScriptedSampler(texts), seeds, settings, tmp_path / "s2", test_questions=tests,
                        previous=previous, id_prefix="syn2", progress=False)
    assert result.counts["dropped"]["near_duplicate_synthetic"] == 2
    assert result.prompts[0]["id"] == "syn2-00000"


def test_synthesis_with_a_tiny_model_adds_up_and_resumes(tmp_path):
    """The loop's entry point over a random tiny checkpoint: its samples are no questions, so they are
    dropped, but every one is counted; a run killed after its first round resumes to the same artifacts."""
    from flax import nnx

    from alphallm_jax.models.decoder import Decoder
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from alphallm_jax.synthesis import d0_problems, synthesize_from_config
    from tests.tiny_lm import arith_tokenizer, model_config

    tok = arith_tokenizer(tmp_path)
    policy = tmp_path / "policy"
    save_hf_checkpoint(Decoder(model_config(tok), rngs=nnx.Rngs(0)), model_config(tok), policy, tokenizer=tok)
    cfg = default_config()
    cfg.sampling.max_len, cfg.sampling.max_batch = 256, 16
    cfg.synthesis.update(dict(method="fewshot,prefix,unconditional", num_prompts=3, oversample=1.0, max_rounds=2,
                              max_new_tokens=12, num_exemplars=1, num_seeds=50))
    seeds = d0_problems(cfg)
    assert len(seeds) == 50 and seeds[0].id == "arith-train-00000"

    def run(out):
        return synthesize_from_config(cfg, policy, seeds, out, seed=1000, id_prefix="syn1", progress=False)

    record = run(tmp_path / "full")
    c = record["counts"]
    assert record["sampled"] == c["generated"] == c["kept"] + sum(c["dropped"].values()) > 0
    assert record["kept"] == c["kept"] and record["prompts_file"] == "prompts.jsonl"
    assert sum(m["generated"] for m in c["by_method"].values()) == c["generated"]
    assert set(c["by_method"]) == {"fewshot", "prefix", "unconditional"}
    assert set(c["test_overlap_by_split"]) == {"arith:dev", "arith:test", "arith:test_hard"}
    # A random model writes no question: the loop and `alphallm synthesize` stop there, naming the drops.
    assert c["kept"] == 0
    with pytest.raises(ValueError, match=r"kept 0 of \d+ .*dropped: .*rejected\.jsonl.*synthesis\.num_prompts"):
        require_prompts(c, tmp_path / "full")
    # Simulate a kill after round 0: only its round file survives; the rerun reads it and samples the rest.
    full, killed = tmp_path / "full", tmp_path / "killed"
    (killed / "rounds").mkdir(parents=True)
    (killed / "rounds" / "round_000.jsonl").write_text((full / "rounds" / "round_000.jsonl").read_text())
    (killed / "settings.json").write_text((full / "settings.json").read_text())
    assert run(killed) == record
    for name in ("prompts.jsonl", "rejected.jsonl", "counts.json"):
        assert (killed / name).read_text() == (full / name).read_text()
    # Killed again, then resumed with another policy: refused, not mixed with the first policy's samples.
    other = tmp_path / "other_policy"
    save_hf_checkpoint(Decoder(model_config(tok), rngs=nnx.Rngs(1)), model_config(tok), other, tokenizer=tok)
    for name in ("DONE", "prompts.jsonl", "rejected.jsonl", "counts.json"):
        (killed / name).unlink()
    with pytest.raises(ValueError, match="policy"):
        synthesize_from_config(cfg, other, seeds, killed, seed=1000, id_prefix="syn1", progress=False)
    assert run(killed) == record


def test_config_section_round_trips():
    cfg = default_config()
    settings = SynthesisSettings.from_config(cfg.synthesis)
    assert settings.method == "fewshot" and settings.dedup.d0_threshold == 0.9
    assert settings.form.banned[-1] == "\\boxed"
    cfg.synthesis.dedup.d0_threshold = 0.5
    assert SynthesisSettings.from_config(cfg.synthesis).dedup.d0_threshold == 0.5


def test_the_synthesize_command_samples_with_the_loops_seed_for_an_iteration():
    # `alphallm synthesize --iteration N` and the loop's iteration N draw the same samples: one seed rule.
    from alphallm_jax.config import default_config
    from alphallm_jax.synthesis import SynthesisSettings
    from alphallm_jax.synthesis.run import iteration_seed, settings_for_iteration

    cfg = default_config()
    cfg.seed, cfg.synthesis.seed = 3, 11
    base = SynthesisSettings.from_config(cfg.synthesis).seed
    for it in (1, 2):
        assert settings_for_iteration(cfg, it).seed == base + iteration_seed(cfg, it) == 11 + 3 + 1000 * it
