"""Prompt formats, solution formatting and step splitting.

Formats (a config string):

* ``"plain"`` -- ``"Question: {question}\\nAnswer:\\n"``; the model then writes the
  solution one step per line (the unit eta-MCTS expands: an option ends at a newline)
  and a final ``#### N`` line (GSM8K/arith) or a ``\\boxed{}`` answer (MATH). The default
  for the arith task and tiny models.
* ``"fewshot"`` -- ``k`` worked exemplars in the same plain format, separated by blank
  lines, then the plain prompt. Exemplars come from a TRAIN split chosen by a fixed seed
  (:func:`fewshot_exemplars`; for arith, the train split of the run's generator config and
  seed); exemplars from an evaluation split (by ``meta["split"]`` or by their id), or whose
  question is the problem's own, are refused.
* ``"chat"`` -- the problem (and exemplars as earlier turns) as chat messages rendered
  by ``tokenizer.apply_chat_template`` (any object with that method returning a str;
  HF tokenizers get ``tokenize=False, add_generation_prompt=True``).
"""

from __future__ import annotations

import functools
import inspect
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from alphallm_jax.data.problems import Problem

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
    max_solution_chars: int | None = None,
) -> list[Problem]:
    """``k`` exemplars with solutions drawn from ``pool`` by a fixed seed.

    Problems without a solution, whose question is excluded, whose solution contains an
    ``[asy]`` figure, or (``max_solution_chars``) longer solutions are not eligible.
    """
    excluded = set(exclude_questions)
    eligible = [
        p
        for p in pool
        if p.solution
        and p.question not in excluded
        and "[asy]" not in p.solution
        and (max_solution_chars is None or len(p.solution) <= max_solution_chars)
    ]
    if len(eligible) < k:
        raise ValueError(f"only {len(eligible)} eligible exemplars in a pool of {len(pool)}, need {k}")
    rng = random.Random(f"alphallm-exemplars|{seed}")
    return rng.sample(eligible, k)


@functools.lru_cache(maxsize=16)
def _fewshot_cached(task: str, k: int, seed: int, data_dir: str | None, arith_seed: int, arith_config: Any,
                    arith_hard_config: Any) -> tuple[Problem, ...]:
    from alphallm_jax.data.loaders import DEFAULT_TRAIN_SPLIT, load_dataset

    pool = load_dataset(f"{task}:{DEFAULT_TRAIN_SPLIT[task]}", data_dir=data_dir, arith_seed=arith_seed,
                        arith_config=arith_config, arith_hard_config=arith_hard_config)
    max_chars = 700 if task == "math" else None
    return tuple(select_exemplars(pool, k, seed, max_solution_chars=max_chars))


def fewshot_exemplars(
    task: str,
    k: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    *,
    arith_seed: int = 0,
    arith_config: Any = None,
    arith_hard_config: Any = None,
) -> list[Problem]:
    """``k`` exemplars from the task's TRAIN split (gsm8k:train, math:train4500,
    arith:train), chosen by ``seed``; cached.

    The arith train split is the one generated with ``arith_seed``, ``arith_config`` and
    ``arith_hard_config`` (as :func:`~alphallm_jax.data.loaders.load_dataset` takes them;
    the hard config matters too: train excludes the test_hard questions). A run passes its
    own (``pipeline.evaluation.prompt_builder``), so its exemplars come from the train split
    of the task it is evaluated on.
    """
    k = DEFAULT_NUM_EXEMPLARS[task] if k is None else k
    return list(_fewshot_cached(task, k, seed, None if data_dir is None else str(data_dir), arith_seed,
                                arith_config, arith_hard_config))


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
