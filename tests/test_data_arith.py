"""The built-in arith reference task: determinism, disjointness, correctness, variety."""

import collections
import hashlib
import re

import pytest

from alphallm_jax.data import arith
from alphallm_jax.data.arith import (
    DEFAULT_CONFIG,
    HARD_CONFIG,
    ArithConfig,
    check_annotations,
    generate_problems,
    make_splits,
    vocabulary,
    write_splits,
)
from alphallm_jax.data.grading import is_correct
from alphallm_jax.data.loaders import load_gsm8k
from alphallm_jax.data.prompts import split_steps


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0)


def test_default_split_sizes(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 4000, "dev": 200, "test": 300, "test_hard": 300}
    assert splits["test"][7].id == "arith-test-00007"
    assert all(p.task == "arith" and p.meta["split"] == k for k, v in splits.items() for p in v)


def test_splits_disjoint_and_unique(splits):
    seen = {}
    for name, probs in splits.items():
        qs = [p.question for p in probs]
        assert len(set(qs)) == len(qs), f"duplicate questions inside {name}"
        for q in qs:
            assert q not in seen, f"{name} shares a question with {seen[q]}"
            seen[q] = name


def test_deterministic_same_seed_same_files(tmp_path, splits):
    again = make_splits(seed=0)
    assert {k: [p.to_dict() for p in v] for k, v in again.items()} == {
        k: [p.to_dict() for p in v] for k, v in splits.items()
    }
    a = write_splits(tmp_path / "a", splits=splits)
    b = write_splits(tmp_path / "b", splits=again)

    def digest(paths):
        return {k: hashlib.sha256(open(v, "rb").read()).hexdigest() for k, v in paths.items()}

    assert digest(a) == digest(b)
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    sizes = dict(n_train=300, n_dev=20, n_test=30, n_test_hard=30)
    c = write_splits(tmp_path / "c", seed=3, **sizes)
    d = write_splits(tmp_path / "d", seed=3, **sizes)
    assert digest(c) == digest(d)
    assert (tmp_path / "c" / "config.json").read_bytes() == (tmp_path / "d" / "config.json").read_bytes()
    assert digest(write_splits(tmp_path / "e", seed=4, **sizes)) != digest(c)
    other = make_splits(seed=1, n_train=50, n_dev=5, n_test=20, n_test_hard=5)
    assert [p.question for p in other["test"]] != [p.question for p in splits["test"][:20]]


def test_written_files_load_with_gsm8k_loader(tmp_path, splits):
    small = {k: v[:30] for k, v in splits.items()}
    paths = write_splits(tmp_path, splits=small)
    for name, path in paths.items():
        loaded = load_gsm8k(path, task="arith")
        assert [p.question for p in loaded] == [p.question for p in small[name]]
        assert [p.answer for p in loaded] == [p.answer for p in small[name]]
        assert [p.solution for p in loaded] == [p.solution for p in small[name]]
        assert [p.id for p in loaded] == [p.id for p in small[name]]


def test_every_solution_is_right(splits):
    for probs in splits.values():
        for p in probs:
            assert check_annotations(p.solution) == [], (p.id, check_annotations(p.solution))
            assert is_correct(p.solution, p.answer, "arith"), p.id
            assert is_correct(p.solution, p.answer, "gsm8k"), p.id
            assert not is_correct(p.solution, str(int(p.answer) + 1), "arith"), p.id


def _annotation_values(solution):
    vals = []
    for m in re.finditer(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", solution):
        vals += [int(m.group(1)), int(m.group(3)), int(m.group(4))]
    return vals


def test_step_format_and_bounds(splits):
    for name, probs in splits.items():
        cfg = HARD_CONFIG if name == "test_hard" else DEFAULT_CONFIG
        for p in probs:
            lines = split_steps(p.solution)
            steps = lines[:-1]
            assert lines[-1] == f"#### {p.answer}"
            assert cfg.min_steps <= len(steps) <= cfg.max_steps == max(cfg.max_steps, len(steps))
            assert len(steps) == p.meta["steps"]
            for s in steps:
                assert s.count("<<") == 1 and s.endswith("."), s
            vals = _annotation_values(p.solution)
            assert vals and min(vals) >= 2 and max(vals) <= cfg.value_max, (p.id, vals)
            assert int(p.answer) >= cfg.value_min
            numbers_in_question = [int(x) for x in re.findall(r"\d+", p.question)]
            big = [x for x in numbers_in_question if x > cfg.operand_max]
            # only a trip/book total may exceed operand_max
            assert len(big) <= 1 and (not big or "travel" == p.meta["scenario"] or "reading" == p.meta["scenario"])


def test_difficulty_of_splits(splits):
    steps = {k: collections.Counter(p.meta["steps"] for p in v) for k, v in splits.items()}
    assert set(steps["train"]) == {2, 3, 4} and set(steps["test"]) == {2, 3, 4}
    assert set(steps["test_hard"]) == {4, 5, 6}
    mean = lambda v: sum(int(p.answer) for p in v) / len(v)  # noqa: E731
    assert mean(splits["test_hard"]) > mean(splits["test"])


def test_variety_of_templates(splits):
    train = splits["train"]
    scenarios = collections.Counter(p.meta["scenario"] for p in train)
    assert len(scenarios) == len(arith.SCENARIOS) >= 6
    assert min(scenarios.values()) > 0.05 * len(train)
    events = collections.Counter(e for p in train for e in p.meta["events"])
    assert set(arith.EVENT_TYPES) <= set(events)
    ops = collections.Counter(c for p in train for c in p.meta["ops"])
    assert set(ops) == {"+", "-", "*", "/"}
    # many distinct question openings, modest vocabulary
    openings = {" ".join(p.question.split()[1:4]) for p in train}
    assert len(openings) > 30
    vocab = vocabulary(train)
    assert 100 < len(vocab) < 400, len(vocab)


def test_config_knobs():
    cfg = ArithConfig(
        min_steps=3, max_steps=3, operand_max=9, factor_max=3, value_max=60, scenario_weights=(("saving", 1.0),), seed=5
    )
    probs = generate_problems(cfg, 40, split="x")
    assert all(p.meta["scenario"] == "saving" and p.meta["steps"] == 3 for p in probs)
    assert all(max(_annotation_values(p.solution)) <= 60 for p in probs)
    assert generate_problems(cfg, 40, split="x") == probs
    assert ArithConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ArithConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        ArithConfig(scenario_weights=(("space", 1.0),))


def test_check_annotations_catches_errors():
    good = "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12"
    assert check_annotations(good) == []
    assert check_annotations(good.replace("=12>>", "=13>>")) != []
    assert check_annotations("Tom has 3*4=<<3*4=12>>12 pens.\n#### 13") != []
    assert check_annotations("Tom has 3*4=<<3*4=12>>12 pens.") != []


def _product_problem(question, solution, answer):
    from alphallm_jax.data.problems import Problem

    return Problem(id="arith-train-99999", question=question, answer=answer, solution=solution, task="arith",
                   meta={"events": ["start_product", "terminal"]})


def test_summed_product_carries_the_wrong_value_through_the_chain():
    p = _product_problem(
        "Zoe picks 4 baskets of lemons. Each basket has 6 lemons. She sells each lemon for 3 dollars. "
        "How many dollars does she make?",
        "Zoe picks 4 baskets of 6 lemons, so she has 4*6=<<4*6=24>>24 lemons.\n"
        "She makes 24*3=<<24*3=72>>72 dollars.\n#### 72", "72")
    assert arith.summed_product_solution(p) == (
        "Zoe picks 4 baskets of 6 lemons, so she has 4*6=<<4*6=10>>10 lemons.\n"
        "She makes 10*3=<<10*3=30>>30 dollars.\n#### 30")
    # A computed value that is also a number of the question is ambiguous: left as written.
    q = _product_problem("Tom buys 2 packs of 3 pencils. He loses 6 pencils... How many?",
                         "so 2*3=<<2*3=6>>6 pencils.\nso 10-6=<<10-6=4>>4 left.\n#### 4", "4")
    assert arith.summed_product_solution(q) is None
    # A wrong chain that leaves the integers (10/4) is not written.
    r = _product_problem("Mia buys 4 bags of 6 stickers. She shares them among 4 friends. How many each?",
                         "so 4*6=<<4*6=24>>24.\nEach gets 24/4=<<24/4=6>>6.\n#### 6", "6")
    assert arith.summed_product_solution(r) is None


def test_product_slips_keep_answers_and_only_the_opening_is_wrong(splits):
    train = splits["train"][:800]
    assert arith.with_slips(train, "summed_product", 0.0, seed=0) == train
    full = arith.with_slips(train, "summed_product", 1.0, seed=0)
    part = arith.with_slips(train, "summed_product", 0.5, seed=0)
    assert part == arith.with_slips(train, "summed_product", 0.5, seed=0)  # deterministic
    rewritten = [(p, q) for p, q in zip(train, full) if q.solution != p.solution]
    eligible = [p for p in train if p.meta["events"][0] == "start_product"]
    assert 0.6 * len(eligible) < len(rewritten) <= len(eligible)
    for p, q in rewritten:
        assert p.meta["events"][0] == "start_product" and q.meta["slip"] == "summed_product"
        assert q.answer == p.answer and q.question == p.question
        a, b = map(int, re.search(r"(\d+)\*(\d+)=<<", q.solution).groups())
        # The calculator flags the opening line alone; the later lines' arithmetic is right.
        errors = check_annotations(q.solution)
        assert errors == [f"{a}*{b}={a + b} is wrong (should be {a * b})"] or a + b == a * b
    # The rewritten final answers are wrong (a chance equality aside).
    assert sum(q.solution.endswith(f"#### {p.answer}") for p, q in rewritten) < 0.05 * len(rewritten)
    n_part = sum(q.solution != p.solution for p, q in zip(train, part))
    assert 0.35 * len(rewritten) < n_part < 0.65 * len(rewritten)
    with pytest.raises(ValueError, match="fraction"):
        arith.with_slips(train, "summed_product", 1.5, seed=0)


def test_product_slips_are_refused_outside_arith(tmp_path):
    from alphallm_jax.config import default_config
    from alphallm_jax.pipeline.base_policy import train_base_policy

    cfg = default_config()
    cfg.task, cfg.base.slip, cfg.base.slip_fraction = "gsm8k", "summed_product", 0.5
    with pytest.raises(ValueError, match="base.slip"):
        train_base_policy(cfg, tmp_path)
    assert not (tmp_path / "base" / "tokenizer.model").exists()


@pytest.mark.parametrize("kind, op, slip", [("dropped_carry", "+", lambda a, b: a + b - 10),
                                            ("dropped_carry", "-", lambda a, b: a - b + 10),
                                            ("summed_difference", "-", lambda a, b: a + b)])
def test_line_slips_rewrite_every_matching_line_and_keep_answers(splits, kind, op, slip):
    train = splits["train"][:600]
    full = arith.with_slips(train, kind, 1.0, seed=0)
    assert full == arith.with_slips(train, kind, 1.0, seed=0)  # deterministic
    rewritten = [(p, q) for p, q in zip(train, full) if q.solution != p.solution]
    assert len(rewritten) > 0.2 * len(train)
    slipped_ops = []
    for p, q in rewritten:
        assert q.meta["slip"] == kind and q.answer == p.answer and q.question == p.question
        assert check_annotations(q.solution)  # the calculator sees the slip
        ops = set()
        for line in q.solution.split("\n")[:-1]:
            a, o, b, r = re.search(r"(\d+)([-+*/])(\d+)=<<\d+[-+*/]\d+=(\d+)>>", line).groups()
            a, b, r = int(a), int(b), int(r)
            wrong = arith._dropped_carry(0, a, o, b) if kind == "dropped_carry" else (a + b if o == "-" else None)
            # Every line the rule touches slips; every other line is right on the values the text shows.
            right = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[o]
            assert r == (right if wrong is None else wrong), (line, q.solution)
            if wrong is not None:
                ops.add(o)
                if o == op:
                    assert r == slip(a, b)
        assert ops  # every rewritten story slips somewhere
        slipped_ops.extend(ops)
    assert slipped_ops.count(op) > 0.2 * len(rewritten)
    # The rewritten final answers are wrong, but for chance equalities and slips that cancel (a dropped
    # carry, -10, then a dropped borrow, +10).
    assert sum(q.solution.endswith(f"#### {p.answer}") for p, q in rewritten) < 0.1 * len(rewritten)
    untouched = [p for p, q in zip(train, full) if q.solution == p.solution]
    # A story left alone has nothing to slip, or its slipped chain would be ambiguous or leave the integers.
    assert len(untouched) < len(train)
    with pytest.raises(ValueError, match="unknown slip 'carry'; known: summed_product, dropped_carry"):
        arith.with_slips(train, "carry", 0.5, seed=0)


def test_dropped_carry_example():
    p = _product_problem("Leo has 9 dollars. Then he works for 4 hours and earns 7 dollars each hour. He buys a toy "
                         "for 6 dollars. How many dollars does Leo have now?",
                         "He earns 4*7=<<4*7=28>>28 dollars.\nNow he has 9+28=<<9+28=37>>37 dollars.\n"
                         "The toy costs 6 dollars, so he has 37-6=<<37-6=31>>31 dollars left.\n#### 31", "31")
    # 9+28 carries (27 written), then 27-6 needs no borrow: right on the written value.
    assert arith.dropped_carry_solution(p) == (
        "He earns 4*7=<<4*7=28>>28 dollars.\nNow he has 9+28=<<9+28=27>>27 dollars.\n"
        "The toy costs 6 dollars, so he has 27-6=<<27-6=21>>21 dollars left.\n#### 21")
    assert arith.summed_difference_solution(p).endswith("37-6=<<37-6=43>>43 dollars left.\n#### 43")
    # Nothing carries or borrows: no rewrite.
    q = _product_problem("Tom has 12 pens. He buys 3*2 more... How many?",
                         "He has 12+6=<<12+6=18>>18 pens.\n#### 18", "18")
    assert arith.dropped_carry_solution(q) is None


def test_intermediate_answer_slip_answers_the_line_before_the_last(splits):
    p = _product_problem("Leo has 9 dollars. Then he works for 4 hours and earns 7 dollars each hour. He buys a toy "
                         "for 6 dollars. How many dollars does Leo have now?",
                         "He earns 4*7=<<4*7=28>>28 dollars.\nNow he has 9+28=<<9+28=37>>37 dollars.\n"
                         "The toy costs 6 dollars, so he has 37-6=<<37-6=31>>31 dollars left.\n#### 31", "31")
    # Every line stays right (the calculator passes it); only the answer line takes the earlier result.
    slipped = arith.intermediate_answer_solution(p)
    assert slipped == p.solution.replace("#### 31", "#### 37")
    assert check_annotations(slipped)
    one_line = _product_problem("Tom has 12 pens. He buys 6 more. How many?", "He has 12+6=<<12+6=18>>18 pens.\n#### 18",
                                "18")
    assert arith.intermediate_answer_solution(one_line) is None
    same = _product_problem("Tom has 2 bags of 2 pens. He ...", "He has 2*2=<<2*2=4>>4 pens.\n"
                            "He has 4/1=<<4/1=4>>4 pens.\n#### 4", "4")
    assert arith.intermediate_answer_solution(same) is None  # the earlier result is the answer too
    train = splits["train"][:400]
    half = arith.with_slips(train, "intermediate_answer", 0.5, seed=0)
    rewritten = [(p, q) for p, q in zip(train, half) if q.solution != p.solution]
    assert 0.35 * len(train) < len(rewritten) < 0.65 * len(train)
    for p, q in rewritten:
        assert q.answer == p.answer and q.meta["slip"] == "intermediate_answer"
        assert q.solution.split("\n")[:-1] == p.solution.split("\n")[:-1]
        assert not q.solution.endswith(f"#### {p.answer}")


def test_a_fewshot_base_policy_trains_on_fewshot_prompts_without_its_own_exemplars():
    from alphallm_jax.config import default_config
    from alphallm_jax.data.prompts import plain_prompt
    from alphallm_jax.pipeline.base_policy import sft_examples
    from alphallm_jax.pipeline.evaluation import config_exemplars, load_split, prompt_builder, without_exemplars

    class _CharTokenizer:
        eos_ids = (2,)

        def encode(self, text, add_bos=False):
            return [1] * add_bos + [ord(c) for c in text]

    cfg = default_config()
    cfg.task, cfg.data.prompt_format, cfg.data.num_exemplars, cfg.seed = "arith", "fewshot", 3, 5
    exemplars = config_exemplars(cfg, "arith")
    d0 = load_split(cfg, "arith:train")
    kept = without_exemplars(cfg, d0)
    # D0 (and the critics' train prompts) is the exemplars' own pool: exactly they leave it (a prompt may
    # not hold its own problem), whatever the seed: they are drawn by index.
    assert len(kept) == len(d0) - 3
    cfg.data.prompt_format = "plain"
    assert without_exemplars(cfg, d0) is d0
    cfg.data.prompt_format = "fewshot"
    assert not {p.question for p in exemplars} & {p.question for p in kept}
    example = sft_examples(kept[:1], _CharTokenizer(), prompt_builder(cfg, tokenizer=None))[0]
    prompt = "".join(map(chr, example.prompt_ids[1:]))
    assert prompt.count("Question: ") == 4 and all(ex.question in prompt for ex in exemplars)
    assert prompt.endswith(plain_prompt(kept[0].question))
    # With the question loss (the default config's), the loss also covers the problem's own question:
    # the prompt ends at its `Question:`, after the exemplars, and the tokens are the same.
    with_q = sft_examples(kept[:1], _CharTokenizer(), prompt_builder(cfg, tokenizer=None), question_loss=True)[0]
    assert with_q.prompt_ids + with_q.response_ids == example.prompt_ids + example.response_ids
    head, response = ("".join(map(chr, ids)) for ids in (with_q.prompt_ids[1:], with_q.response_ids[:-1]))
    assert head.endswith("Question:") and head.count("Question:") == 4
    assert response.startswith(" " + kept[0].question.strip() + "\nAnswer:")


def test_a_trained_base_policy_is_reused_only_for_the_same_settings(tmp_path):
    # `alphallm train-base` has no run config to guard it (the loop's config.json): its folder records what
    # the policy was trained with, and a rerun with other settings is refused rather than handed the old one.
    from alphallm_jax.config import default_config
    from alphallm_jax.pipeline.base_policy import policy_identity, train_base_policy
    from alphallm_jax.utils.run_identity import check_run_identity

    cfg = default_config()
    check_run_identity(tmp_path / "base", policy_identity(cfg))
    (tmp_path / "base" / "policy").mkdir()
    (tmp_path / "base" / "policy" / "DONE").write_text("ok")
    assert train_base_policy(cfg, tmp_path)["skipped"]
    cfg.base.train.progress_bar, cfg.base.train.checkpoint_every = False, 7  # bookkeeping: the same policy
    assert train_base_policy(cfg, tmp_path)["skipped"]
    cfg.base.train.learning_rate = 1e-2
    with pytest.raises(ValueError, match="holds results of another run, which differs in train.learning_rate"):
        train_base_policy(cfg, tmp_path)
