"""Option text rules: where options stop, final-answer lines, end stops, MATH equations, config."""

from __future__ import annotations

import pytest

from alphallm_jax.search.options import (
    OptionConfig,
    final_answer_end,
    has_equation,
    option_end,
    solution_answer,
)

END = OptionConfig().end_stops("arith")


def test_end_stops_never_include_the_separator():
    assert OptionConfig().separator_for("arith") == "\n" and OptionConfig().separator_for("math") == "\n\n"
    assert END == ("\nQuestion:", "\n\n")  # one step per line: a blank line ends the solution
    assert OptionConfig(solution_stops=("\n\n", "\nQuestion:")).end_stops("math") == ("\nQuestion:",)


def test_the_whole_final_answer_line_is_kept_and_the_rest_cut():
    # The answer line ends at its newline: the run-on text after it is cut off.
    end = option_end("a\n", "#### 42\nQuestion: next", task="arith", finish_reason="stop", stop_string=None,
                     end_stops=END)
    assert (end.keep_chars, end.ends_solution) == (len("#### 42\n"), True)
    # EOS right after the number: the line is complete.
    assert option_end("", "#### 42", task="arith", finish_reason="eos", stop_string=None,
                      end_stops=END).ends_solution
    # Cut by the token cap in the middle of the number: not final yet, nothing cut.
    capped = option_end("", "#### 4", task="arith", finish_reason="length", stop_string=None, end_stops=END)
    assert (capped.keep_chars, capped.ends_solution) == (6, False)
    # ...and the next option completes the line (found over the whole solution text).
    assert option_end("#### 4", "2\n", task="arith", finish_reason="stop", stop_string="\n",
                      end_stops=END).ends_solution


def test_end_stops_blank_steps_and_eos_end_the_solution():
    stop = option_end("", "3+4=7\nQuestion: x", task="arith", finish_reason="stop", stop_string="\nQuestion:",
                      end_stops=END)
    assert (stop.keep_chars, stop.ends_solution) == (len("3+4=7\n"), True)
    blank = option_end("3+4=7\n", "\n", task="arith", finish_reason="stop", stop_string="\n", end_stops=END)
    assert blank.ends_solution
    step = option_end("", "3+4=7\n", task="arith", finish_reason="stop", stop_string="\n", end_stops=END)
    assert (step.keep_chars, step.ends_solution) == (6, False)
    assert option_end("", "3+4", task="arith", finish_reason="eos", stop_string=None, end_stops=END).ends_solution


def test_an_end_stop_that_begins_in_the_previous_step_ends_the_solution():
    # Every step keeps its newline, so "\nQuestion:" spans the option boundary: a sample opening a new
    # question ends the solution where it begins, and the made-up question's answer is not this solution's.
    kwargs = dict(task="arith", stop_string="\n", end_stops=END)
    question = option_end("Tom has 3.\n", "Question: Sam has 4 pens. How many?\n", finish_reason="stop", **kwargs)
    assert (question.keep_chars, question.ends_solution) == (0, True)
    rollout = option_end("Tom has 3.\n", "Question: Sam has 4.\nAnswer:\n#### 4\n", finish_reason="eos", **kwargs)
    assert (rollout.keep_chars, rollout.ends_solution) == (0, True)
    # The same stop inside one sample is cut where it starts, as before.
    inside = option_end("", "Tom has 3.\nQuestion: Sam has 4.\n", finish_reason="stop", **kwargs)
    assert (inside.keep_chars, inside.ends_solution) == (len("Tom has 3.\n"), True)
    # A blank line's second newline is the blank-step rule's, and an answer after it still counts.
    assert option_end("3+4=7\n", "\n", finish_reason="stop", **kwargs) == option_end(
        "", "\n", finish_reason="stop", **kwargs)
    late = option_end("3+4=7\n", "\n#### 7\n", finish_reason="stop", **kwargs)
    assert (late.keep_chars, late.ends_solution) == (len("\n#### 7\n"), True)
    # A step that merely mentions the word is a step.
    step = option_end("Tom has 3.\n", "So Question: asked 3+4=7\n", finish_reason="stop", **kwargs)
    assert (step.keep_chars, step.ends_solution) == (len("So Question: asked 3+4=7\n"), False)


def test_math_boxed_answers():
    text = "So $x = \\boxed{\\frac{1}{2}}$.\n\nMore"
    assert final_answer_end(text, "math", complete=False) == text.index("\n") + 1
    assert final_answer_end("$\\boxed{\\frac{1}{2}", "math", complete=True) is None  # unclosed
    assert final_answer_end("#### 5\n", "math", complete=True) is None
    assert solution_answer(text, "math") == "0.5"  # the canonical key votes compare
    assert solution_answer("1+1=2\n#### 2", "arith") == "2"


def test_equations_for_the_math_extension():
    assert has_equation("so x = 3") and has_equation("$a \\le b$") and not has_equation("Let us think.")


def test_option_config_from_a_config_section():
    c = OptionConfig.from_config({"max_option_tokens": 8, "solution_stops": ["\nQ:"]})
    assert c.max_option_tokens == 8 and c.solution_stops == ("\nQ:",)
    assert OptionConfig.from_config(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        OptionConfig.from_config({"max_tokens": 8})
    with pytest.raises(ValueError):
        OptionConfig(max_option_tokens=0)
