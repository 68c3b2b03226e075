"""The safe calculator and the tool checks: exact arithmetic, wrong steps rejected, input never executed."""

from __future__ import annotations

import builtins
from fractions import Fraction

import numpy as np
import pytest

from alphallm_jax.critics import tools
from alphallm_jax.critics.tools import CalcError, ToolConfig, check_solution, combine_with_checks, evaluate

GOOD = ("The books cost 2*2=<<2*2=4>>4 dollars.\n"
        "So he has 6-4=<<6-4=2>>2 dollars left.\n"
        "His grandma gives him 7 dollars, so he has 2+7=<<2+7=9>>9 dollars.\n#### 9")


@pytest.mark.parametrize("expr,value", [
    ("2+3*4", 14), ("(2+3)*4", 20), ("10/4", Fraction(5, 2)), ("3/4+1/4", 1), ("-3--2", -1), ("+5", 5),
    ("0.1+0.2", Fraction(3, 10)), ("1,200 - 200", 1000), ("50%*20", 10), ("2*(3+(4-1))/3", 4),
    ("$5 * 3", 15), ("7 × 6 ÷ 3 − 1", 13), (".5*4", 2), ("((1))", 1),
    ("560//10", 56), ("7//2", 3), ("-7//2", -4), ("1+7.5//2*2", 7),  # floor division
])
def test_calculator_is_exact(expr, value):
    assert evaluate(expr) == Fraction(value)


@pytest.mark.parametrize("expr", [
    "2**3", "2^3", "abs(-2)", "__import__('os').system('true')", "1/0", "2 3", "(1+2", "1+2)", "", "1+",
    "x*2", "[1]", "1e5", "9" * 40, "(" * 30 + "1" + ")" * 30, "1+" * 200 + "1", "lambda: 1", "2(3)",
])
def test_calculator_rejects_anything_but_arithmetic(expr):
    with pytest.raises(CalcError):
        evaluate(expr)


def test_intermediate_values_are_bounded():
    big = "*".join(["999999999999999999999999999"] * 40)  # ~1000 digits: beyond MAX_BITS
    with pytest.raises(CalcError):
        evaluate(big)


@pytest.mark.parametrize("template", [
    "He has <<2*3=6>>{big} apples.\nThe answer is 6.",  # the written result after an annotation (a loop crash)
    "He has <<{big}*3=6>>6 apples.\nThe answer is 6.",
    "He has 2*3 = {big} apples.\nThe answer is 6.",
    "So {big} + 2 = 5.\nThe answer is {big}.",
    "He has <<1=1>>1/{big} apples.\nThe answer is 1.",  # the denominator after the written result
])
@pytest.mark.parametrize("digits", [40, 5000])  # 5000: past Python's int-from-string limit (4300)
def test_numbers_too_long_to_read_never_raise(template, digits):
    # Model text is data: a 40-digit number (beyond MAX_NUMBER_DIGITS) anywhere in a solution or its question
    # is a check that fails or is skipped, never a CalcError (or ValueError) out of the checks (the search
    # scores such text).
    big = "1" * digits
    text = template.format(big=big)
    cfg = ToolConfig(question_numbers=True, operand_sources=True)
    for task in ("arith", "gsm8k"):
        for complete in (True, False):
            result = check_solution(text, task, cfg, f"Tom has 2 boxes of 3 apples and {big} pears.", complete=complete)
            assert not result.ok or "<<" not in text  # an annotation with an unreadable number never passes


def test_right_solution_passes_and_counts_its_checks():
    r = check_solution(GOOD, "arith")
    assert r.ok and r.failures == []
    assert r.checked == 6  # three annotations and three written equations


@pytest.mark.parametrize("text,why", [
    ("So he has 6-4=<<6-4=3>>3 dollars left.", "wrong annotation"),
    ("So he has 6-4=<<6-4=2>>3 dollars left.", "followed by"),  # annotation right, written result wrong
    ("So he has 6-5=<<6-4=2>>2 dollars left.", "wrong equation"),  # written expression disagrees
    ("He pays 3 * 4 = 13 dollars.", "wrong equation"),
    ("Total <<2+2>> apples", "without '='"),
    ("Total <<two+2=4>> apples", "unreadable"),
])
def test_wrong_steps_are_rejected(text, why):
    r = check_solution(text, "arith")
    assert not r.ok
    assert any(why in f for f in r.failures), r.failures


def test_rounded_results_and_non_equations():
    assert check_solution("Each costs 10/3=<<10/3=3.33>>3.33 dollars.", "gsm8k").ok
    assert check_solution("Each costs 10/3=<<10/3=3.3>>3.3 dollars.", "gsm8k").ok  # rounded to 1 decimal
    assert not check_solution("Each costs 10/3=<<10/3=3.4>>3.4 dollars.", "gsm8k").ok
    r = check_solution("Let x = 5. Half of 20 = 10. Step 1. 2*3=6. She is 12-years old.", "gsm8k")
    assert r.ok and r.checked == 1  # only 2*3=6 is an equation


@pytest.mark.parametrize("text", [
    "2 x 3 + 1 = 7", "60 x 60/100 = 36", "5 x (3 + 4) = 35",  # `x` between operands multiplies
    "half of 10 + 2 = 7", "3 times 4 + 1 = 13", "60 students x 2/3 = 40",  # operator words
    "72 cubic ft * 3/4 = 54 cubic ft", "2(3+4)=14",  # the left side's other operand is not arithmetic
    "Costs:\n- 5 * 2 = 10\n- 10 + 3 = 13",  # list bullets, not minus signs
    "-2+5=3",  # a minus sign, not a bullet
    "100 - 50 = 50% of them",  # a result written as a percentage
    "1. He pays 2*3=<<2*3=6>>\n2. Then he buys more",  # the next line's list numeral, not the result
    "Clayton scored 10 points + 14 + 6 = 30 points", "40 marbles - 3 - 5 = 32",  # a quantity with its unit
    "8 x 1 1/2 = 12 rolls", "3 / 4 * 2 = 1 1/2 square feet", "4 / 3 = 1 and 1/3 hours",  # mixed numbers
    "17 000/5 = 3 400 people", "a $100 000 x 10/100 = $10,000 profit",  # thousands grouped by spaces
    "100/5 = 5A/5 or 20 = A", "3*30 = 30 + M trees",  # algebra: the right side is not a number
    "the sun sets at 6:00+48=6:48 PM",  # a time of day
    "25 / 1/3 = 75 decorations", "2/ 1/5 = 10 cupcakes",  # divided by a fraction, as the spacing groups it
    "5/5 – 1/5 = 4/5",  # an en dash as the minus sign
    "$3/2 = $1.50+$3.00=$4.50", "2*3 = 6 - 1 = 5",  # a chain: a running calculation
    "14 / 1 / 4 = 56 miles", "14/1/4 = 56",  # divided by a proper fraction, evenly spaced
    "9/27*100% = 33.333% of them", "1.2 x 100% = 120 percent",  # ratios as (rounded) percentages
    "every 1% is $7500/75% = $100",  # an amount per percentage point
    "He keeps 560//10=<<560//10=56>>56 boxes.",  # floor division in an annotation
    "She eats <<3/4=3/4>>3/4 of the pie.", "She ate <<3/4=3/4>>3/4.",  # a fraction after its annotation
])
def test_right_equations_written_in_common_ways_pass(text):
    # A left side cut out of a longer expression used to be checked alone (`3+1=7`, `-5*2=10`), and a
    # right side read in part (`1` of `1 1/2`): 349 of GSM8K's 7,473 train reference solutions failed, 86
    # at release 03ba340, 41 at release f6bbc88, 34 now (and 12 -> 4 -> 3 of the 1,319 test ones; most hold
    # a real slip).
    r = check_solution(text, "gsm8k")
    assert r.ok, r.failures


@pytest.mark.parametrize("text,shown", [
    ("2 x 3 + 1 = 8", "2*3+1=8"), ("- 3 * 4 = 13", "3*4=13"), ("100 - 50 = 40%", "100-50=40%"),
    ("he has 2*2 = 5 boxes", "2*2=5"),
    ("25 / 1/3 = 70 decorations", "25/1/3=70"), ("5/5 – 1/5 = 3/5", "5/5-1/5=3/5"),
    ("The scroll is 4080 + 4080 / 2 = 4000 + 2040 = 6120 years old", "4080+4080/2=4000+2040"),
    ("So it cost 192*100=$1920", "192*100=1920"), ("8 x 1 1/2 = 12 and 2*6 = 13", "2*6=13"),
    ("14 / 1 / 4 = 50 miles", "14/1/4=50"), ("14 / 4 / 2 = 7", "14/4/2=7"),  # 4/2: no fraction to group
    ("9/27*100% = 33.5% of them", "9/27*100%=33.5%"), ("1.2 x 100% = 130", "1.2*100%=130"),
    ("so 50% * 20 = 1000", "50%*20=1000"),  # a percent that is no unit
])
def test_wrong_equations_written_in_those_ways_still_fail(text, shown):
    r = check_solution(text, "gsm8k")
    assert r.failures and r.failures[0].startswith(f"wrong equation {shown}:"), r.failures


def test_floor_division_and_fractions_after_annotations_can_be_wrong():
    assert not check_solution("He keeps <<560//10=57>>57 boxes.", "gsm8k").ok
    assert not check_solution("He keeps <<560//10=56>>57 boxes.", "gsm8k").ok
    assert not check_solution("She eats <<3/4=3/4>>2/3 of the pie.", "gsm8k").ok
    # A running calculation after an annotation reads its first number as the result, as before.
    assert check_solution("So 2*3=<<2*3=6>>6/3=<<6/3=2>>2 each.", "gsm8k").ok


def test_an_annotations_result_on_the_next_line_is_still_read():
    assert not check_solution("He pays 2*3=<<2*3=6>>\n7 dollars.", "gsm8k").ok
    assert check_solution("He pays 2*3=<<2*3=6>>\n6 dollars.", "gsm8k").ok


def test_model_text_is_never_executed(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called on model text")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", forbidden)
    text = ("So <<__import__('os').system('touch /tmp/pwned')=0>> and <<open('/etc/passwd').read()=1>>\n"
            "Then exec('1')=2+1 and 3+4=<<3+4=7>>7.\n#### 7")
    r = check_solution(text, "arith")
    assert not r.ok and sum("unreadable" in f for f in r.failures) == 2
    assert r.checked >= 3


def test_tool_checks_can_be_switched_off():
    bad = "So he has 6-4=<<6-4=3>>3 dollars left."
    assert check_solution(bad, "arith", ToolConfig(enabled=False)).ok
    assert not check_solution(bad, "arith", ToolConfig(annotations=False)).ok  # the written equation still fails
    assert check_solution(bad, "arith", ToolConfig(annotations=False, written_equations=False)).ok


def test_step_checks_fold_into_a_search_states_value_and_prm():
    """`critics.tools.steps`: the search backend scores a state whose text holds a wrong calculation down
    (value and PRM times the penalty), leaves a right one and the scores it did not ask for alone."""
    from types import SimpleNamespace

    from alphallm_jax.search.lm_backend import LMSearchBackend
    from alphallm_jax.search.protocol import NodeScores

    texts = [" He has 2+3=<<2+3=5>>5 apples.\n", " He has 2+3=<<2+3=6>>6 apples.\n", " So 4*5=21.\n", ""]
    requests = [SimpleNamespace(handle=SimpleNamespace(text=t)) for t in texts]
    scores = [NodeScores(value=0.8, prm=0.6), NodeScores(value=0.8, prm=0.6), NodeScores(value=0.5),
              NodeScores()]
    backend = SimpleNamespace(task="arith", scorer=SimpleNamespace(tools=ToolConfig(steps=True, penalty=0.1)))
    LMSearchBackend._fold_step_checks(backend, requests, scores)
    got = [(s.value, s.prm) for s in scores]
    assert got == [(pytest.approx(0.8), pytest.approx(0.6)), (pytest.approx(0.08), pytest.approx(0.06)),
                   (pytest.approx(0.05), None), (None, None)]

    # With the question checks on, the state's question comes from its prompt: a state that uses a number
    # from nowhere is scored down; one that has not yet used every question number is not (it is partial).
    prompt = "Question: Tom has 2 apples and buys 3 more, then 4 more. How many apples?\nAnswer:\n"
    requests = [SimpleNamespace(handle=SimpleNamespace(text=t, prompt=prompt))
                for t in (" He has 2+3=<<2+3=5>>5 apples.\n", " He has 2+7=<<2+7=9>>9 apples.\n")]
    scores = [NodeScores(value=0.8), NodeScores(value=0.8)]
    tools = ToolConfig(steps=True, penalty=0.1, question_numbers=True, operand_sources=True)
    LMSearchBackend._fold_step_checks(SimpleNamespace(task="arith", scorer=SimpleNamespace(tools=tools)),
                                      requests, scores)
    assert [s.value for s in scores] == [pytest.approx(0.8), pytest.approx(0.08)]


def test_combine_with_checks_modes():
    orm = np.array([0.9, 0.9, 0.2], np.float32)
    ok = np.array([1.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(combine_with_checks(orm, ok, ToolConfig(combine="none")), orm)
    np.testing.assert_allclose(combine_with_checks(orm, ok, ToolConfig(combine="product", penalty=0.1)),
                               [0.9, 0.09, 0.2], rtol=1e-6)
    np.testing.assert_allclose(combine_with_checks(orm, ok, ToolConfig(combine="mix", mix_weight=0.5)),
                               [0.95, 0.45, 0.6], rtol=1e-6)
    np.testing.assert_allclose(combine_with_checks(orm, ok, ToolConfig(combine="min")), [0.9, 0.0, 0.2])
    with pytest.raises(ValueError, match="combine"):
        ToolConfig(combine="max")


def test_numeric_latex_equations_are_found_and_symbolic_ones_skipped():
    text = (r"We get $2+3=5$ and $x+1=2$, then \[\frac{1}{2}\cdot 4 = 2 = \sqrt{4}\] and "
            r"\(\frac{3}{4} = 0.75\).")
    assert tools.numeric_latex_equations(text) == [
        ("2+3", "5"), (r"\frac{1}{2}\cdot 4", "2"), ("2", r"\sqrt{4}"), (r"\frac{3}{4}", "0.75")]


def test_math_equations_checked_by_sympy_off_the_main_thread():
    pytest.importorskip("math_verify")
    assert check_solution(r"So $\frac{1}{2} + \frac{1}{3} = \frac{5}{6}$ and $2^{10} = 1024$.", "math").ok
    r = check_solution(r"So $\frac{1}{2} + \frac{1}{3} = \frac{2}{5}$.", "math")
    assert not r.ok and "sympy" in r.failures[0]


def _whole_text_check(text: str, cfg: ToolConfig) -> tools.CheckResult:
    """The checks run on the text in one piece (what `check_solution` computes chunk by chunk)."""
    result = tools.CheckResult()
    if cfg.annotations:
        result = result.merge(tools.check_annotations(text, cfg.rel_tol))
    if cfg.written_equations:
        result = result.merge(tools.check_written_equations(text, cfg.rel_tol))
    return result


def test_line_chunked_memoised_checks_equal_whole_text_checks():
    # Fragments that put annotations, their trailing numbers and equations across line ends.
    pieces = ["<<", ">>", "\n", "\n", "2*3=6", "2*3=7", "=", "6", " 6", "$", " ", "7-2", "+", "(", ")", "x",
              "<<4/2=2>>", "<<4/2=3>>", ">", "<", "1,200", "10%", "\t", " x ", "of ", "- ", "3("]
    rng = np.random.default_rng(0)
    cfgs = [ToolConfig(), ToolConfig(annotations=False), ToolConfig(written_equations=False)]
    for _ in range(3000):
        text = "".join(rng.choice(pieces, size=int(rng.integers(1, 30))))
        for cfg in cfgs:
            got, want = check_solution(text, "arith", cfg), _whole_text_check(text, cfg)
            assert (got.checked, got.failures) == (want.checked, want.failures), repr(text)
        assert "".join(tools.line_chunks(text)) == text
    # A solution's lines are separate chunks; an annotation whose number follows on the next line is not.
    assert tools.line_chunks("a 2+2=<<2+2=4>>4\nb 4*2=<<4*2=8>>8\n#### 8") == [
        "a 2+2=<<2+2=4>>4\n", "b 4*2=<<4*2=8>>8\n", "#### 8"]
    assert tools.line_chunks("<<2+2=4>>\n5 apples") == ["<<2+2=4>>\n5 apples"]
    assert not check_solution("<<2+2=4>>\n5 apples", "arith").ok


def test_question_numbers_every_stated_number_must_be_an_operand():
    from alphallm_jax.critics.tools import calculation_operands, check_question_numbers, stated_numbers

    q = "Nina reads 2 pages every day for 5 days. On her holiday she reads 4 pages each day for 5 days."
    right = "She reads 5*2=<<5*2=10>>10 pages.\nThen 4*5=<<4*5=20>>20 pages.\nIn all 10+20=<<10+20=30>>30.\n#### 30"
    assert stated_numbers(q) == {2: 1, 5: 2, 4: 1}
    assert check_question_numbers(q, right).ok and check_question_numbers(q, right).checked == 1
    # 5 is stated twice and used once: the second 5 days were never counted.
    once = "She reads 5*2=<<5*2=10>>10 pages.\nThen 2*4=<<2*4=8>>8 pages.\nIn all 10+8=<<10+8=18>>18.\n#### 18"
    found = check_question_numbers(q, once)
    assert not found.ok and found.failures == ["question numbers never used in a calculation: 5"]
    # Written equations count, and `a*b=<<a*b=c>>c` is one calculation, not two.
    assert calculation_operands("So 5*2=<<5*2=10>>10 and 4*5 = 20 and 10+20=30.") == {5: 2, 2: 1, 4: 1, 10: 1,
                                                                                      20: 1}
    assert check_question_numbers("He has $1,200 and 3.5 kg.", "So 1200*3.5=4200.").ok
    assert not check_question_numbers("He has 7 apples.", "#### 7").ok  # an answer line is no calculation


def test_question_numbers_only_for_complete_solutions_with_a_question():
    q = "Kate has 10 pencils. She gives 4 friends 2 pencils each. Then she buys 7 more pencils."
    wrong = "She gives away 4*2=<<4*2=8>>8 pencils.\nSo she has 10-8=<<10-8=2>>2 pencils left.\n#### 2"
    on = ToolConfig(question_numbers=True)
    assert check_solution(wrong, "arith", ToolConfig()).ok  # the calculator alone finds nothing
    assert not check_solution(wrong, "arith", on, question=q).ok
    assert check_solution(wrong, "arith", on).ok  # a search state: no question, no check
    assert [c.ok for c in tools.check_solutions([wrong, wrong], "arith", on, [q, None])] == [False, True]
    with pytest.raises(ValueError, match="1 questions for 2"):
        tools.check_solutions([wrong, wrong], "arith", on, [q])


def test_operand_sources_every_operand_is_a_question_number_or_an_earlier_result():
    from alphallm_jax.critics.tools import check_operand_sources, given_numbers

    q = "Max has 14 pies. He gives half of them to Zoe. Then he bakes a dozen more. How many pies now?"
    assert given_numbers(q) == {14, 2, 12}
    right = "He gives 14/2=<<14/2=7>>7 pies.\nHe has 14-7=<<14-7=7>>7 left.\nThen 7+12=<<7+12=19>>19.\n#### 19"
    found = check_operand_sources(q, right)
    assert found.ok and found.checked == 6  # three annotations, three written equations
    # 3 is nowhere in the question and no earlier line wrote it: a misread question.
    stray = "He gives 14/3=<<14/3=5>>5 pies.\n"
    found = check_operand_sources(q, stray)
    assert not found.ok and found.failures[0] == ("<<14/3=5>> uses 3: neither a number of the question nor an "
                                                  "earlier result")
    # A result is available from its own line on (chained on one line), never before it is written.
    assert check_operand_sources(q, "So 14-2=12 and 12+12=24.").ok
    assert not check_operand_sources(q, "So 7+12=19.\nThen 14/2=7.").ok
    # Partial solutions are checked as they stand; decimals and thousands separators read as numbers.
    assert check_operand_sources("It costs $1,200 for 3.5 kg.", "So 1200/3.5=<<1200/3.5=342.86>>342.86").ok


def test_operand_sources_checks_partial_solutions_where_question_numbers_waits():
    q = "Kate has 10 pencils. She gives 4 friends 2 pencils each. Then she buys 7 more pencils."
    partial = "She gives away 4*2=<<4*2=8>>8 pencils.\n"
    misread = "She gives away 4*3=<<4*3=12>>12 pencils.\n"
    both = ToolConfig(question_numbers=True, operand_sources=True)
    assert both.needs_question and not ToolConfig().needs_question
    assert check_solution(partial, "arith", both, question=q, complete=False).ok
    assert not check_solution(partial, "arith", both, question=q).ok  # complete: 10 and 7 never used
    assert not check_solution(misread, "arith", both, question=q, complete=False).ok
    assert check_solution(misread, "arith", ToolConfig(), question=q, complete=False).ok  # arithmetic is right
    assert [c.ok for c in tools.check_solutions([partial, misread], "arith", both, [q, q], complete=False)] == [
        True, False]


def test_arith_reference_solutions_pass_both_question_checks():
    """The checks suit arith: its generator uses every number it states, and nothing else."""
    from alphallm_jax.critics.tools import check_question_numbers
    from alphallm_jax.data.arith import HARD_CONFIG, ArithConfig, generate_problems

    for cfg in (ArithConfig(), HARD_CONFIG):
        for p in generate_problems(cfg, 300, 0, split="check"):
            assert check_question_numbers(p.question, p.solution).ok, (p.question, p.solution)
            assert tools.check_operand_sources(p.question, p.solution).ok, (p.question, p.solution)


@pytest.mark.parametrize("text", [
    "$2^3 - 1 = 7$", "$x^2-25=0$", "$a_2+3=7$", "$x^{2} + 3 + 4 = 9$",  # a power or subscript before the left side
    "so $f(5)-5=2$", "$3 \\cdot 4 + 1 = 13$", "$\\sqrt2+1=2.41$",  # a function, a LaTeX product or command
    "$2+6=2^3$", "$2*5=5(2)$", "$200=196+4=28\\cdot7+4$", "$22/7=3.\\overline{142857}$",  # the right side goes on
    "\\[(x - 90) + (2x - 135) + 90 + 60 + 15 + 60 + 15 + 15 = 360.\\]",  # an operator after a closing bracket
    "(7 * V) + (4 * 5) = $69.",
])
def test_equations_inside_larger_expressions_are_not_checked(text):
    # The scan used to stop at `^`, `_` or a letter and check only what followed it (`3-1=7` of `2^3 - 1 = 7`).
    for task in ("gsm8k", "math"):
        r = check_solution(text, task, ToolConfig(latex=False))
        assert r.ok and r.checked == 0, r.failures


@pytest.mark.parametrize("text,shown", [
    ("$2+3=7$ and $x^2$", "2+3=7"), ("$2 \\cdot 3 = 6$ and $2+5 = 8$", "2+5=8"),
    ("He had 10 so because20-3 = 18 left", "20-3=18"),  # a word glued to it is a missing space
    ("(2 + 3) + 4 = 10", "(2+3)+4=10"), ("$2 + 3 = 6$, so $x^2 = 6$", "2+3=6"),
])
def test_wrong_equations_next_to_powers_and_words_still_fail(text, shown):
    r = check_solution(text, "gsm8k")
    assert r.failures and r.failures[0].startswith(f"wrong equation {shown}:"), r.failures


def test_percentage_written_after_an_annotation_is_read_with_its_percent_sign():
    # `20%` after `<<10/50=20%>>` was read as 20 against the annotation's 0.2.
    assert check_solution("So she sold <<10/50=20%>>20% of them.", "gsm8k").ok
    assert check_solution("So she sold <<10/50*100=20>>20% of them.", "gsm8k").ok
    r = check_solution("So she sold <<10/50=20%>>30% of them.", "gsm8k")
    assert r.failures == ["<<10/50=20%>> followed by 30"]
    assert not check_solution("So she sold <<10/50*100=20>>30% of them.", "gsm8k").ok


LATEX_ONLY = ToolConfig(annotations=False, written_equations=False)


@pytest.mark.parametrize("text", [
    "So $4+5=9.$", "We have $r = \\sqrt{0^2 + 3^2} = 3.$ Also", "$4+5=9,$ so",  # sentence punctuation
    "$2(5)-3=7$", "$12(20)=240$", "$(2)(5)=10$", "$2\\left(5\\right)=10$",  # implicit products
    "$010_2=2_8$", "$1000_{14} = 1 \\cdot 14^3$",  # number bases
    "$10000 \\cdot 0.07=700$", "$\\frac{5.7}{99} = \\frac{57}{990}$",  # decimals math-verify's floats miss
    "$\\sqrt{2} = 1.414214$",  # its float reading still takes a rounded result
    "$2 * 6 = 2^6 + 6^2$",  # an operation the problem defines
    "$6^4 = 2^43^4$", "$64^\\frac{1}{3} = 4$", "$\\sqrt[3]{-8}=-2$",  # LaTeX math-verify misreads
    "$$1^2 + 2^2 +\n3^2 = 14$$", "$3\\times\n6=18$",  # a newline inside an expression
    "$6.9999852\\cdot5.9999985401=41.99...$",  # a truncated decimal
])
def test_right_latex_equations_pass(text):
    pytest.importorskip("math_verify")
    r = check_solution(text, "math", LATEX_ONLY)
    assert r.ok, r.failures


@pytest.mark.parametrize("text,shown", [
    ("So $4+5=10.$", "4+5 != 10"), ("$2(5)-3=8$", "2(5)-3 != 8"), ("$12(20)=32$", "12(20) != 32"),
    ("$10000 \\cdot 0.07=70$", "10000 \\cdot 0.07 != 70"), ("$3\\times\n6=17$", "3\\times 6 != 17"),
    ("$1029+51\\frac{9}{10}=1080\\frac{9}{20}$", "1029+51\\frac{9}{10} != 1080\\frac{9}{20}"),
])
def test_wrong_latex_equations_still_fail(text, shown):
    pytest.importorskip("math_verify")
    r = check_solution(text, "math", LATEX_ONLY)
    assert r.failures == [f"sympy: {shown}"], r.failures


def test_latex_equations_math_verify_cannot_tell_are_unchecked(monkeypatch):
    """A timeout or a side math-verify cannot parse is no verdict: the equation passes, uncounted."""
    pytest.importorskip("math_verify")
    from alphallm_jax.data import grading

    assert grading.math_verify_verdict("4+5", "9") is True
    assert grading.math_verify_verdict("4+5", "10") is False
    assert grading.math_verify_verdict("4+5", "9.") is None  # `9.` is no number to math-verify
    assert grading.math_verify_verdict("1" * 500, "1") is None  # too long to try
    assert grading.math_verify_equal("4+5", "9.") is False  # answer grading is unchanged
    monkeypatch.setattr(grading, "math_verify_verdict", lambda pred, gold: None)
    r = check_solution("So $\\frac{1}{2} + \\frac{1}{3} = \\frac{2}{5}$.", "math")
    assert r.ok and r.checked == 0


@pytest.mark.parametrize("inner_timeout_s", [1, 60])  # math-verify's own timeout; the caller's wall clock
def test_latex_equation_that_times_out_is_unchecked(inner_timeout_s):
    pytest.importorskip("math_verify")
    from alphallm_jax.data import grading

    old = grading.math_verify_config()
    grading.configure_math_verify(timeout_s=2.0, inner_timeout_s=inner_timeout_s)
    try:
        assert grading.math_verify_verdict("9^{9^{9^{9}}}", "\\sqrt{2}+1") is None
        r = check_solution("So $9^{9^{9^{9}}} = \\sqrt{2}+1$.", "math")
        assert r.ok and r.checked == 0
        assert not check_solution("So $4+5=10$.", "math").ok  # the pool recovers
    finally:
        grading.configure_math_verify(timeout_s=old.timeout_s, inner_timeout_s=old.inner_timeout_s)
