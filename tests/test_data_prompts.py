"""Prompt formats, exemplar selection, solution formatting and step splitting."""

from pathlib import Path

import pytest

from alphallm_jax.data.loaders import load_dataset
from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import (
    chat_messages,
    fewshot_exemplars,
    final_answer_marker,
    format_prompt,
    format_solution,
    select_exemplars,
    sft_example,
    split_steps,
    step_separator,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"shared data dir {DATA_DIR} is absent (expected ../shared/data beside the repo)"
)


def _p(q="Tom has 3 pens. He buys 2 more. How many pens?", sol="3+2=<<3+2=5>>5\n#### 5", task="arith", split="test"):
    return Problem(f"{task}-{split}-00000", q, "5", sol, task, {"split": split})


def test_plain_prompt():
    p = _p()
    assert format_prompt(p) == "Question: Tom has 3 pens. He buys 2 more. How many pens?\nAnswer:\n"
    assert format_prompt(p, "plain") == format_prompt(p)
    with pytest.raises(ValueError):
        format_prompt(p, "nope")


def test_fewshot_arith_uses_train_split():
    test_problem = load_dataset("arith:test")[0]
    prompt = format_prompt(test_problem, "fewshot")
    exemplars = fewshot_exemplars("arith")
    assert len(exemplars) == 4 and all(e.meta["split"] == "train" for e in exemplars)
    assert fewshot_exemplars("arith") == exemplars  # fixed seed
    assert fewshot_exemplars("arith", seed=1) != exemplars
    blocks = prompt.split("\n\n")
    assert len(blocks) == 5
    for block, ex in zip(blocks, exemplars, strict=False):
        assert block.startswith(f"Question: {ex.question}\nAnswer:\n")
        assert block.endswith(f"#### {ex.answer}")
    assert blocks[-1] == f"Question: {test_problem.question}\nAnswer:\n"


def test_fewshot_refuses_eval_exemplars():
    p = _p(split="test")
    leaked = _p(q="Another question?", split="test")
    with pytest.raises(ValueError, match="evaluation split"):
        format_prompt(p, "fewshot", exemplars=[leaked])
    itself = _p(split="train")
    with pytest.raises(ValueError, match="itself"):
        format_prompt(p, "fewshot", exemplars=[itself])


def test_fewshot_arith_exemplars_follow_the_generator_config_and_seed():
    from alphallm_jax.data.arith import ArithConfig

    config = ArithConfig(min_steps=3, max_steps=5, operand_max=15)
    exemplars = fewshot_exemplars("arith", arith_seed=2, arith_config=config)
    train = {p.question for p in load_dataset("arith:train", arith_seed=2, arith_config=config)}
    assert all(e.question in train and e.meta["split"] == "train" for e in exemplars)
    assert fewshot_exemplars("arith", arith_seed=2, arith_config=config) == exemplars  # fixed seed
    assert not {e.question for e in exemplars} & {e.question for e in fewshot_exemplars("arith")}


def test_exemplars_are_vetted_by_their_id_and_a_reflowed_question_too():
    p = _p(split="test")
    # Rebuilt without its meta, a test problem still names its split in its loader id.
    leaked = Problem("gsm8k-test-00003", "Another question?", "5", "#### 5", "gsm8k", {})
    with pytest.raises(ValueError, match="evaluation split 'test'"):
        format_prompt(p, "fewshot", exemplars=[leaked])
    with pytest.raises(ValueError, match="evaluation split 'test'"):
        format_prompt(p, "chat", exemplars=[leaked], tokenizer=_DuckTokenizer())
    reflowed = _p(q="Tom has 3 pens.\n  He buys 2 more.   How many pens? ", split="train")
    with pytest.raises(ValueError, match="itself"):
        format_prompt(p, "fewshot", exemplars=[reflowed])
    fine = Problem("gsm8k-train-00003", "Another question?", "5", "#### 5", "gsm8k", {})
    assert format_prompt(p, "fewshot", exemplars=[fine]).count("Question: ") == 2


@needs_data
def test_fewshot_gsm8k_and_math_formats():
    g = load_dataset("gsm8k:test", data_dir=DATA_DIR, limit=1)[0]
    prompt = format_prompt(g, "fewshot", data_dir=str(DATA_DIR))
    assert prompt.count("Question: ") == 5 and prompt.count("\n#### ") == 4
    assert "<<" in prompt  # calculator annotations kept
    m = load_dataset("math:math500", data_dir=DATA_DIR, limit=1)[0]
    exs = fewshot_exemplars("math", data_dir=str(DATA_DIR))
    assert all(e.meta["split"] == "train4500" for e in exs)
    mp = format_prompt(m, "fewshot", exemplars=exs)
    assert mp.count("\\boxed") >= 4 and mp.endswith(f"Question: {m.question}\nAnswer:\n")


@needs_data
def test_fewshot_exemplars_leave_out_the_evaluated_split():
    from alphallm_jax.data.prompts import question_key

    test5000 = load_dataset("math:test5000", data_dir=DATA_DIR)
    drawn = fewshot_exemplars("math", data_dir=str(DATA_DIR))
    # math:train4500 lies inside math:test5000: the usual draw holds test5000 problems, format_prompt refuses
    # to show a problem its own copy, and a whole few-shot run on test5000 used to die on the first of them.
    keys = {question_key(p.question): p for p in test5000}
    assert all(question_key(e.question) in keys for e in drawn)
    exs = fewshot_exemplars("math", data_dir=str(DATA_DIR), exclude=test5000)
    assert len(exs) == 4 and not {question_key(e.question) for e in exs} & set(keys)
    for e in drawn:
        assert format_prompt(keys[question_key(e.question)], "fewshot", exemplars=exs).count("Question: ") == 5
    # A split that does not meet the pool leaves the draw as it was; one inside it only loses its own problems.
    assert fewshot_exemplars("math", data_dir=str(DATA_DIR),
                             exclude=load_dataset("math:math500", data_dir=DATA_DIR)) == drawn
    dev = load_dataset("math:train_dev", data_dir=DATA_DIR)
    dev_exs = fewshot_exemplars("math", seed=3, data_dir=str(DATA_DIR), exclude=dev)
    assert all(e.meta["split"] == "train4500" for e in dev_exs) and not {e.id for e in dev_exs} & {p.id for p in dev}
    gsm = fewshot_exemplars("gsm8k", data_dir=str(DATA_DIR), exclude=load_dataset("gsm8k:test", data_dir=DATA_DIR))
    assert gsm == fewshot_exemplars("gsm8k", data_dir=str(DATA_DIR))


@needs_data
def test_builtin_math_exemplars_are_math_train_problems_outside_the_test_set():
    from alphallm_jax.data.grading import answers_equal, is_correct
    from alphallm_jax.data.prompts import builtin_exemplars, question_key

    train = {question_key(p.question): p for p in load_dataset("math:train_answers", data_dir=DATA_DIR)}
    test = {question_key(p.question) for p in load_dataset("math:test5000", data_dir=DATA_DIR)}
    exs = builtin_exemplars("math")
    assert len(exs) == 4 and builtin_exemplars("gsm8k") == ()
    for e in exs:
        assert question_key(e.question) in train and question_key(e.question) not in test
        assert answers_equal(e.answer, train[question_key(e.question)].answer, "math")
        assert is_correct(format_solution(e.solution, "math", e.answer), e.answer, "math")


def test_select_exemplars_excludes_by_id_and_by_reflowed_question():
    pool = [Problem(f"g-train-{i}", f"Question {i} here?", "1", "#### 1", "gsm8k", {"split": "train"})
            for i in range(4)]
    ex = select_exemplars(pool, 2, exclude_questions={"  Question 0\n here? "}, exclude_ids={"g-train-1"})
    assert {e.id for e in ex} == {"g-train-2", "g-train-3"}
    with pytest.raises(ValueError):
        select_exemplars(pool, 3, exclude_ids={"g-train-1", "g-train-2"})


class _DuckTokenizer:
    """Only the documented minimum: apply_chat_template(messages) -> str."""

    def apply_chat_template(self, messages):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


class _HFLikeTokenizer:
    def __init__(self):
        self.calls = []

    def apply_chat_template(self, conversation, tools=None, tokenize=True, add_generation_prompt=False, **kwargs):
        self.calls.append((tokenize, add_generation_prompt))
        if tokenize:
            return [1, 2, 3]
        return "|".join(m["content"] for m in conversation) + ("|GEN" if add_generation_prompt else "")


def test_chat_format():
    p = _p(task="gsm8k")
    out = format_prompt(p, "chat", tokenizer=_DuckTokenizer(), system="Be brief.")
    assert out.startswith("<system>Be brief.</system><user>Tom has 3 pens.")
    assert "#### <answer>" in out and out.endswith("<assistant>")
    hf = _HFLikeTokenizer()
    ex = _p(q="Sam has 1 pen and gets 1. How many?", sol="1+1=<<1+1=2>>2\n#### 2", task="gsm8k", split="train")
    out = format_prompt(p, "chat", exemplars=[ex], tokenizer=hf)
    assert hf.calls == [(False, True)] and out.endswith("|GEN")
    msgs = chat_messages(p, [ex])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "1+1=<<1+1=2>>2\n#### 2"
    with pytest.raises(ValueError):
        format_prompt(p, "chat")
    math_p = Problem("m", "What is 1/2+1/2?", "1", None, "math", {})
    assert "\\boxed{}" in format_prompt(math_p, "chat", tokenizer=_DuckTokenizer())


def test_format_solution_and_steps():
    raw = "  Tom has 3 pens.  \n\nHe buys 2, so 3+2=<<3+2=5>>5 pens. #### 5\nextra junk"
    sol = format_solution(raw, "gsm8k")
    assert sol == "Tom has 3 pens.\nHe buys 2, so 3+2=<<3+2=5>>5 pens.\n#### 5"
    assert split_steps(sol) == ["Tom has 3 pens.", "He buys 2, so 3+2=<<3+2=5>>5 pens.", "#### 5"]
    assert format_solution("3+2=<<3+2=5>>5", "arith", answer="5") == "3+2=<<3+2=5>>5\n#### 5"
    m = format_solution("First.\r\n\n\n\nSo $x=2$.", "math", answer="2")
    assert m == "First.\n\nSo $x=2$.\nThe answer is $\\boxed{2}$."
    assert split_steps(m, "\n\n") == ["First.", "So $x=2$.\nThe answer is $\\boxed{2}$."]
    assert format_solution("So $\\boxed{2}$.", "math", answer="2") == "So $\\boxed{2}$."


def test_markers_and_sft_example():
    assert final_answer_marker("gsm8k") == "####" == final_answer_marker("arith")
    assert final_answer_marker("math") == "\\boxed"
    assert step_separator("arith") == "\n" and step_separator("math") == "\n\n"
    prompt, target = sft_example(_p(split="train"))
    assert prompt.endswith("Answer:\n") and target == "3+2=<<3+2=5>>5\n#### 5"


def test_select_exemplars_filters():
    pool = [
        Problem(f"g-train-{i}", f"q{i}", "1", "s\n#### 1" if i % 2 else None, "gsm8k", {"split": "train"})
        for i in range(10)
    ]
    ex = select_exemplars(pool, 3, seed=0, exclude_questions={"q1"})
    assert len(ex) == 3 and all(e.solution for e in ex) and all(e.question != "q1" for e in ex)
    with pytest.raises(ValueError):
        select_exemplars(pool, 6)


def test_question_of_prompt_reads_the_last_question():
    from alphallm_jax.data.prompts import plain_prompt, question_of_prompt

    assert question_of_prompt(plain_prompt("  Ann has 3 cats. ")) == "Ann has 3 cats."
    fewshot = plain_prompt("Bo has 2 dogs.") + " 2\n#### 2\n\n" + plain_prompt("Cy has 5 hens.")
    assert question_of_prompt(fewshot) == "Cy has 5 hens."
    assert question_of_prompt("<|user|>Cy has 5 hens.<|assistant|>") is None
