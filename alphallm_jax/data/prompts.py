"""Prompt formats, solution formatting and step splitting.

Formats (a config string):

* ``"plain"`` -- ``"Question: {question}\\nAnswer:\\n"``; the model then writes the
  solution one step per line (the unit eta-MCTS expands: an option ends at a newline)
  and a final ``#### N`` line (GSM8K/arith) or a ``\\boxed{}`` answer (MATH). The default
  for the arith task and tiny models.
* ``"fewshot"`` -- ``k`` worked exemplars in the same plain format, separated by blank
  lines, then the plain prompt. Exemplars come from a TRAIN split chosen by a fixed seed
  (:func:`fewshot_exemplars`; for arith, the train split of the run's generator config and
  seed), never a problem of the evaluated split (math:test5000 holds all of math:train4500: there
  Minerva's four MATH train exemplars are used); exemplars from an evaluation split (by
  ``meta["split"]`` or by their id), or whose question is the problem's own, are refused.
* ``"chat"`` -- the problem (and exemplars as earlier turns) as chat messages rendered
  by ``tokenizer.apply_chat_template`` (any object with that method returning a str;
  HF tokenizers get ``tokenize=False, add_generation_prompt=True``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from alphallm_jax.data.problems import Problem

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("plain", "fewshot", "chat")
QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "Answer:\n"
EXEMPLAR_SEPARATOR = "\n\n"
DEFAULT_NUM_EXEMPLARS = {"gsm8k": 4, "arith": 4, "math": 4}
# Split names an exemplar must never come from (checked on Problem.meta["split"]).
EVAL_SPLIT_NAMES = ("test", "dev", "test_hard", "test_socratic", "math500", "test5000")

INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step. Write one step per line and end with a line '#### <answer>'.",
    "arith": "Solve the problem step by step. Write one step per line and end with a line '#### <answer>'.",
    "math": "Solve the problem step by step. Put the final answer in \\boxed{}.",
}


def final_answer_marker(task: str) -> str:
    """The text that introduces the final answer: ``"####"`` or ``"\\boxed"`` (MATH)."""
    if task in ("gsm8k", "arith"):
        return "####"
    if task == "math":
        return "\\boxed"
    raise ValueError(f"unknown task {task!r}")


def step_separator(task: str) -> str:
    """The default option terminator: one line per step (GSM8K, arith), paragraphs (MATH)."""
    return "\n\n" if task == "math" else "\n"


# --------------------------------------------------------------------------------------
# Solutions and steps
# --------------------------------------------------------------------------------------

_HASH_INLINE_RE = re.compile(r"\s*####\s*")


def format_solution(solution_text: str, task: str = "gsm8k", answer: str | None = None) -> str:
    """A reference solution in the step format the policy is trained to write.

    GSM8K/arith: one step per line (lines stripped, blank lines removed), ``<<a*b=c>>``
    annotations kept, the final answer on its own last line ``#### N`` (an inline
    ``... #### N`` is split onto its own line; when the text has none and ``answer`` is
    given, ``#### answer`` is appended). MATH: the text with normalised line endings and
    trailing spaces removed, at most one blank line between paragraphs; when it has no
    ``\\boxed{}`` and ``answer`` is given, ``The answer is $\\boxed{answer}$.`` is appended.
    No trailing newline (the end of the solution is EOS).
    """
    text = solution_text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if task in ("gsm8k", "arith"):
        lines: list[str] = []
        final: str | None = None
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            if "####" in line:
                before, after = line.split("####", 1)
                if before.strip():
                    lines.append(before.strip())
                if final is None:
                    final = after.strip()
                continue
            if final is None:
                lines.append(line)
        if final is None and answer is not None:
            final = answer.strip()
        if final is not None:
            lines.append(f"#### {final}")
        return "\n".join(lines)
    if task == "math":
        lines = [line.rstrip() for line in text.split("\n")]
        out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if answer is not None and "\\boxed" not in out and "\\fbox" not in out:
            out += f"\nThe answer is $\\boxed{{{answer}}}$."
        return out
    raise ValueError(f"unknown task {task!r}")


def split_steps(solution: str, sep: str = "\n") -> list[str]:
    """The steps of a solution: pieces between ``sep`` (stripped, empty ones dropped).

    ``sep`` is ``"\\n"`` for the step-per-line format and ``"\\n\\n"`` for paragraph
    steps. The separators themselves are not included; ``sep.join(steps)`` rebuilds a
    normalised solution.
    """
    text = solution.replace("\r\n", "\n")
    return [s.strip() for s in text.split(sep) if s.strip()]


# --------------------------------------------------------------------------------------
# Exemplars
# --------------------------------------------------------------------------------------


def select_exemplars(
    pool: Sequence[Problem],
    k: int,
    seed: int = 0,
    *,
    exclude_questions: Iterable[str] = (),
    exclude_ids: Iterable[str] = (),
    max_solution_chars: int | None = None,
) -> list[Problem]:
    """``k`` exemplars with solutions drawn from ``pool`` by a fixed seed.

    Problems without a solution, whose question (spacing normalised, :func:`question_key`) or id is
    excluded, whose solution contains an ``[asy]`` figure, or (``max_solution_chars``) longer solutions are
    not eligible.
    """
    eligible = _eligible_exemplars(pool, exclude_questions, exclude_ids, max_solution_chars)
    if len(eligible) < k:
        raise ValueError(f"only {len(eligible)} eligible exemplars in a pool of {len(pool)}, need {k}")
    rng = random.Random(f"alphallm-exemplars|{seed}")
    return rng.sample(eligible, k)


def _eligible_exemplars(pool: Sequence[Problem], exclude_questions: Iterable[str] = (),
                        exclude_ids: Iterable[str] = (), max_solution_chars: int | None = None) -> list[Problem]:
    excluded_keys = {question_key(q) for q in exclude_questions}
    excluded_ids = set(exclude_ids)
    return [
        p
        for p in pool
        if p.solution
        and p.id not in excluded_ids
        and question_key(p.question) not in excluded_keys
        and "[asy]" not in p.solution
        and (max_solution_chars is None or len(p.solution) <= max_solution_chars)
    ]


# Minerva's four MATH exemplars (Lewkowycz et al. 2022, app. D): MATH *train* problems with worked solutions.
# The only other MATH solutions at hand, math:train4500, all lie in math:test5000, so few-shot evaluation on
# test5000 draws from these instead (tests check that they are train problems and none is in test5000).
_MATH_BUILTIN_EXEMPLARS = (
    (
        "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, "
        "and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which "
        "gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.",
        "[2,5)",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) "
        "= \\boxed{24}.$",
        "24",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
        "times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
        "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
        "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
        "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}",
        "16",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a "
        "solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
        "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$",
        "-\\frac{2}{3}",
    ),
)
BUILTIN_EXEMPLAR_SPLIT = "minerva"


def builtin_exemplars(task: str) -> tuple[Problem, ...]:
    """The built-in exemplars of ``task`` (MATH: Minerva's four; none for the others)."""
    if task != "math":
        return ()
    return tuple(Problem(f"math-{BUILTIN_EXEMPLAR_SPLIT}-{i:05d}", q, a, sol, "math", {"split": BUILTIN_EXEMPLAR_SPLIT})
                 for i, (q, sol, a) in enumerate(_MATH_BUILTIN_EXEMPLARS))


@functools.lru_cache(maxsize=16)
def _fewshot_cached(task: str, k: int, seed: int, data_dir: str | None, arith_seed: int, arith_config: Any,
                    arith_hard_config: Any, exclude_ids: frozenset[str] = frozenset(),
                    exclude_keys: frozenset[str] = frozenset()) -> tuple[Problem, ...]:
    from alphallm_jax.data.loaders import DEFAULT_TRAIN_SPLIT, load_dataset

    pool = load_dataset(f"{task}:{DEFAULT_TRAIN_SPLIT[task]}", data_dir=data_dir, arith_seed=arith_seed,
                        arith_config=arith_config, arith_hard_config=arith_hard_config)
    max_chars = 700 if task == "math" else None
    eligible = _eligible_exemplars(pool, exclude_keys, exclude_ids, max_chars)
    builtin = _eligible_exemplars(builtin_exemplars(task), exclude_keys, exclude_ids)
    if len(eligible) < k and (exclude_ids or exclude_keys) and len(builtin) >= k:
        # The evaluated split covers the train pool (math:test5000 holds all of math:train4500).
        log.info("%s few-shot: %d of the %d train problems lie outside the evaluated split, %d needed; using "
                 "the built-in exemplars", task, len(eligible), len(pool), k)
        return tuple(select_exemplars(builtin, k, seed))
    return tuple(select_exemplars(pool, k, seed, exclude_questions=exclude_keys, exclude_ids=exclude_ids,
                                  max_solution_chars=max_chars))


def fewshot_exemplars(
    task: str,
    k: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    *,
    arith_seed: int = 0,
    arith_config: Any = None,
    arith_hard_config: Any = None,
    exclude: Iterable[Problem] = (),
) -> list[Problem]:
    """``k`` exemplars from the task's TRAIN split (gsm8k:train, math:train4500,
    arith:train), chosen by ``seed``; cached.

    The arith train split is the one generated with ``arith_seed``, ``arith_config`` and
    ``arith_hard_config`` (as :func:`~alphallm_jax.data.loaders.load_dataset` takes them;
    the hard config matters too: train excludes the test_hard questions). A run passes its
    own (``pipeline.evaluation.prompt_builder``), so its exemplars come from the train split
    of the task it is evaluated on.

    No problem of ``exclude`` (the evaluated split: matched by id and by question) is drawn. Where that
    leaves fewer than ``k`` (MATH evaluated on math:test5000, which holds all of math:train4500), the
    exemplars come from :func:`builtin_exemplars`; else the draw is the same as without ``exclude`` when
    nothing in the pool is excluded.
    """
    k = DEFAULT_NUM_EXEMPLARS[task] if k is None else k
    exclude = list(exclude)
    return list(_fewshot_cached(task, k, seed, None if data_dir is None else str(data_dir), arith_seed,
                                arith_config, arith_hard_config, frozenset(p.id for p in exclude),
                                frozenset(question_key(p.question) for p in exclude)))


_ID_SPLIT_RE = re.compile(r"^(?:gsm8k|math|arith)-(?P<split>.+)-\d+$")  # the loaders' `{task}-{split}-{index}`


def _exemplar_splits(ex: Problem) -> set[str]:
    """The split an exemplar says it comes from: its ``meta["split"]`` and the split its loader id names (a
    problem rebuilt without its meta still carries the id)."""
    splits = {str(ex.meta.get("split", "")) if ex.meta else ""}
    match = _ID_SPLIT_RE.match(ex.id)
    if match:
        splits.add(match["split"])
    return splits


def question_key(question: str) -> str:
    """A question with its spacing normalised: a reflowed or re-indented copy is the same question."""
    return " ".join(question.split())


def _check_exemplars(problem: Problem, exemplars: Sequence[Problem]) -> None:
    for ex in exemplars:
        if question_key(ex.question) == question_key(problem.question):
            raise ValueError(f"exemplar {ex.id} is the problem {problem.id} itself")
        leaked = sorted(_exemplar_splits(ex) & set(EVAL_SPLIT_NAMES))
        if leaked:
            raise ValueError(f"exemplar {ex.id} comes from evaluation split {leaked[0]!r}; use a train split")
        if not ex.solution:
            raise ValueError(f"exemplar {ex.id} has no solution")


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def plain_prompt(question: str) -> str:
    return f"{QUESTION_PREFIX}{question.strip()}\n{ANSWER_PREFIX}"


def question_of_prompt(prompt: str) -> str | None:
    """The question of a ``plain`` or ``fewshot`` prompt (the last one, after its exemplars); None for a
    text without ``Question: `` (a chat prompt, whose turn markup depends on the template)."""
    start = prompt.rfind(QUESTION_PREFIX)
    if start < 0:
        return None
    start += len(QUESTION_PREFIX)
    end = prompt.find("\n" + ANSWER_PREFIX.rstrip("\n"), start)
    return prompt[start:end if end >= 0 else len(prompt)].strip()


def _exemplar_block(ex: Problem) -> str:
    return plain_prompt(ex.question) + format_solution(ex.solution or "", ex.task, ex.answer)


def _apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    fn = getattr(tokenizer, "apply_chat_template", None)
    if fn is None:
        raise TypeError("the 'chat' format needs a tokenizer with an apply_chat_template method")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "tokenize" in params or var_kw:
        kwargs["tokenize"] = False
    if "add_generation_prompt" in params or var_kw:
        kwargs["add_generation_prompt"] = True
    out = fn(messages, **kwargs)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, expected str")
    return out


def chat_messages(
    problem: Problem, exemplars: Sequence[Problem] = (), system: str | None = None
) -> list[dict[str, str]]:
    """The chat turns for ``problem``: optional system turn, exemplar turns, the question."""
    instruction = INSTRUCTIONS[problem.task]
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for ex in exemplars:
        messages.append({"role": "user", "content": f"{ex.question.strip()}\n{instruction}"})
        messages.append({"role": "assistant", "content": format_solution(ex.solution or "", ex.task, ex.answer)})
    messages.append({"role": "user", "content": f"{problem.question.strip()}\n{instruction}"})
    return messages


def format_prompt(
    problem: Problem,
    fmt: str = "plain",
    exemplars: Sequence[Problem] | None = None,
    tokenizer: Any = None,
    *,
    system: str | None = None,
    num_exemplars: int | None = None,
    exemplar_seed: int = 0,
    data_dir: str | None = None,
) -> str:
    """The prompt text for ``problem`` in format ``fmt`` (``plain``/``fewshot``/``chat``).

    ``fewshot`` without ``exemplars`` draws ``num_exemplars`` from the task's train split
    with ``exemplar_seed`` (:func:`fewshot_exemplars`). ``chat`` needs ``tokenizer`` and
    uses ``exemplars`` (if given) as earlier turns.
    """
    if fmt == "plain":
        return plain_prompt(problem.question)
    if fmt == "fewshot":
        if exemplars is None:
            exemplars = fewshot_exemplars(problem.task, num_exemplars, exemplar_seed, data_dir)
        _check_exemplars(problem, exemplars)
        blocks = [_exemplar_block(ex) for ex in exemplars]
        return EXEMPLAR_SEPARATOR.join(blocks + [plain_prompt(problem.question)])
    if fmt == "chat":
        if tokenizer is None:
            raise ValueError("the 'chat' format needs a tokenizer with apply_chat_template")
        exs = list(exemplars or [])
        _check_exemplars(problem, exs)
        return _apply_chat_template(tokenizer, chat_messages(problem, exs, system))
    raise ValueError(f"unknown prompt format {fmt!r}; expected one of {PROMPT_FORMATS}")


def sft_example(
    problem: Problem,
    fmt: str = "plain",
    exemplars: Sequence[Problem] | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> tuple[str, str]:
    """``(prompt, target)`` for supervised training: the target is the formatted reference
    solution (loss on target tokens only; the caller appends EOS)."""
    if not problem.solution:
        raise ValueError(f"problem {problem.id} has no reference solution")
    prompt = format_prompt(problem, fmt, exemplars, tokenizer, **kwargs)
    return prompt, format_solution(problem.solution, problem.task, problem.answer)
