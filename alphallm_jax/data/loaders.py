"""Loaders for GSM8K, MATH and the built-in arith task, and named-split resolution.

Files are JSONL, read through :mod:`alphallm_jax.utils.io` (local or ``gs://``).

* GSM8K format (also written by :func:`alphallm_jax.data.arith.write_splits`): fields
  ``question`` and ``answer``, the answer being the solution with ``<<a*b=c>>``
  calculator annotations and a final ``#### N`` line. ``Problem.answer`` is N with
  thousands commas removed, ``Problem.solution`` the full answer text.
* MATH format: ``problem``, and ``solution`` and/or ``answer``; optional ``level`` (an
  int or ``"Level 3"``), ``subject`` or ``type``, ``unique_id``, ``idx``. Without an
  ``answer`` field the final answer is the last ``\\boxed{}``/``\\fbox{}`` of the solution.

Errors are never silent: a malformed line raises :class:`DataFormatError` naming the
file and the 1-based line; a missing or mistyped field raises it naming the field too.
Rows that cannot be graded (a MATH row whose answer is empty or whose solution has no
``\\boxed{}``) are dropped by default and the count, reason and line numbers are
logged (``on_unusable="error"`` raises instead, ``"keep"`` keeps them with an empty
answer).

Problem ids are stable: ``{task}-{split}-{line index:05d}`` with the 0-based index of
the row in its file, so ids do not change with ``limit`` or with dropped rows.

Named splits (:func:`load_dataset`), relative to the data root::

    gsm8k:train          gsm8k/train.jsonl
    gsm8k:test           gsm8k/test.jsonl          (default GSM8K eval split)
    gsm8k:test_socratic  gsm8k/test_socratic.jsonl
    math:math500         math/math500_test.jsonl   (default MATH eval split; alias math:test)
    math:test5000        math/math_test_full5000.jsonl
    math:train_answers   math/math_train7500_answers_only.jsonl (answers, no solutions)
    math:train4500       math:test5000 minus the MATH500 problems (Lightman et al.'s
                         train problems that have solutions; few-shot exemplars, except
                         when evaluating on math:test5000, which holds them all)
    gsm8k:train_dev      the last 500 problems of gsm8k:train (ids unchanged): a held-out dev
    math:train_dev       the last 500 problems of math:train4500 (likewise)
    arith:train|dev|test|test_hard   generated in memory by alphallm_jax.data.arith

The data root is, in order: the ``data_dir`` argument (a config field), the
``ALPHALLM_DATA_DIR`` environment variable, ``<repo>/../shared/data`` next to a source
checkout of this package, ``./shared/data`` and ``../shared/data`` relative to the
working directory; the first that exists wins (see :func:`resolve_data_dir`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alphallm_jax.data.grading import format_number, last_boxed, parse_number
from alphallm_jax.data.problems import Problem
from alphallm_jax.utils.io import DataFormatError, PathLike, as_path, iter_jsonl

log = logging.getLogger(__name__)

DATA_DIR_ENV = "ALPHALLM_DATA_DIR"

NAMED_FILES: dict[str, tuple[str, str]] = {
    "gsm8k:train": ("gsm8k", "gsm8k/train.jsonl"),
    "gsm8k:test": ("gsm8k", "gsm8k/test.jsonl"),
    "gsm8k:test_socratic": ("gsm8k", "gsm8k/test_socratic.jsonl"),
    "math:math500": ("math", "math/math500_test.jsonl"),
    "math:test5000": ("math", "math/math_test_full5000.jsonl"),
    "math:train_answers": ("math", "math/math_train7500_answers_only.jsonl"),
}
DERIVED_SPLITS = ("math:train4500", "gsm8k:train_dev", "math:train_dev")
# A held-out tail of a training split (critic calibration, early stopping): GSM8K and MATH have no dev
# split. Train on the first len(train) - HELD_OUT_DEV problems (a split limit) to keep them disjoint.
HELD_OUT_DEV = 500
ARITH_SPLITS = ("arith:train", "arith:dev", "arith:test", "arith:test_hard")
ALIASES = {"math:test": "math:math500", "math:math500_test": "math:math500", "math:train": "math:train4500"}
DEFAULT_EVAL_SPLIT = {"gsm8k": "test", "math": "math500", "arith": "test"}
DEFAULT_TRAIN_SPLIT = {"gsm8k": "train", "math": "train4500", "arith": "train"}


def available_splits() -> list[str]:
    return sorted(list(NAMED_FILES) + list(DERIVED_SPLITS) + list(ARITH_SPLITS))


# --------------------------------------------------------------------------------------
# Data root
# --------------------------------------------------------------------------------------


def _repo_root() -> Path:
    # alphallm_jax/data/loaders.py -> parents[2] is the directory holding the package
    return Path(__file__).resolve().parents[2]


def data_dir_candidates() -> list[str]:
    cands = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        cands.append(env)
    cands.append(str(_repo_root().parent / "shared" / "data"))
    cwd = Path.cwd()
    cands.append(str(cwd / "shared" / "data"))
    cands.append(str(cwd.parent / "shared" / "data"))
    return cands


def resolve_data_dir(data_dir: PathLike | None = None):
    """The data root as an ``epath.Path``; see the module docstring for the order.

    An explicit ``data_dir`` or ``$ALPHALLM_DATA_DIR`` is used as given (it must exist);
    otherwise the first existing default location is used.
    """
    if data_dir is not None:
        p = as_path(data_dir)
        if not p.exists():
            raise FileNotFoundError(f"data_dir {str(p)!r} does not exist")
        return p
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        p = as_path(env)
        if not p.exists():
            raise FileNotFoundError(f"${DATA_DIR_ENV}={env!r} does not exist")
        return p
    for c in data_dir_candidates():
        if Path(c).is_dir():
            return as_path(c)
    raise FileNotFoundError(
        "no data directory found; pass data_dir (config field data.data_dir) or set "
        f"${DATA_DIR_ENV}. Looked in: " + ", ".join(data_dir_candidates())
    )


# --------------------------------------------------------------------------------------
# Row helpers
# --------------------------------------------------------------------------------------


def _require_str(row: Any, key: str, path, line: int, *, allow_empty: bool = False) -> str:
    if not isinstance(row, dict):
        raise DataFormatError(path, line, f"expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataFormatError(path, line, f"missing field {key!r} (fields: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(path, line, f"field {key!r} is empty")
    return value


def _split_name(path, split: str | None) -> str:
    if split:
        return split
    return as_path(path).name.split(".")[0]


def gsm8k_final_answer(solution: str) -> str | None:
    """N from the first ``#### N`` line of a GSM8K solution, commas removed; else None."""
    for line in solution.split("\n"):
        s = line.strip()
        if s.startswith("####"):
            ans = s[4:].strip().replace(",", "")
            return ans or None
    return None


def _log_drops(path, dropped: dict[str, list[int]], total: int, expected: tuple[str, ...] = ()) -> None:
    """Log every group of dropped rows (WARNING; INFO for drops the caller asked for)."""
    for reason, lines in dropped.items():
        if lines:
            shown = ", ".join(str(n) for n in lines[:20]) + (" ..." if len(lines) > 20 else "")
            log.log(
                logging.INFO if reason in expected else logging.WARNING,
                "%s: dropped %d of %d rows: %s (lines %s)",
                path,
                len(lines),
                total,
                reason,
                shown,
            )


# --------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------


def load_gsm8k(
    path: PathLike,
    limit: int | None = None,
    *,
    split: str | None = None,
    task: str = "gsm8k",
) -> list[Problem]:
    """Problems from a GSM8K-format JSONL file (also the arith task's files).

    Args:
      path: the JSONL file.
      limit: keep at most this many problems (the first ones in the file).
      split: split name used in ids; defaults to the file name without extension.
      task: ``"gsm8k"`` or ``"arith"`` (the grading/prompt family of the problems).

    Raises DataFormatError on a malformed line, a missing/non-string ``question`` or
    ``answer`` field, an answer without a ``#### N`` line, or a final answer that is
    not a number.
    """
    if task not in ("gsm8k", "arith"):
        raise ValueError(f"load_gsm8k: task must be 'gsm8k' or 'arith', got {task!r}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    split = _split_name(path, split)
    out: list[Problem] = []
    if limit == 0:
        return out
    for index, (line, row) in enumerate(iter_jsonl(path)):
        question = _require_str(row, "question", path, line)
        solution = _require_str(row, "answer", path, line)
        final = gsm8k_final_answer(solution)
        if final is None:
            raise DataFormatError(path, line, "field 'answer' has no '#### N' final-answer line")
        value = parse_number(final)
        if value is None:
            raise DataFormatError(path, line, f"field 'answer': final answer {final!r} is not a number")
        out.append(
            Problem(
                id=f"{task}-{split}-{index:05d}",
                question=question.strip(),
                answer=format_number(value),
                solution=solution.strip(),
                task=task,
                meta={"split": split, "line": line, "source": str(path)},
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------------------
# MATH
# --------------------------------------------------------------------------------------


def _parse_level(level: Any) -> int | None:
    if isinstance(level, bool):
        return None
    if isinstance(level, int):
        return level
    if isinstance(level, str):
        tail = level.strip().split()[-1] if level.strip() else ""
        if tail.isdigit():
            return int(tail)
    return None


def load_math(
    path: PathLike,
    limit: int | None = None,
    *,
    split: str | None = None,
    on_unusable: str = "drop",
    exclude_questions: Iterable[str] = (),
) -> list[Problem]:
    """Problems from a MATH-format JSONL file.

    The final answer is the ``answer`` field when present, else the last
    ``\\boxed{}``/``\\fbox{}`` of ``solution``. ``on_unusable`` decides what happens to a
    row with no usable answer (empty ``answer``, or no ``answer`` and no box in the
    solution): ``"drop"`` (default; logged with count and lines), ``"error"`` or
    ``"keep"`` (answer ``""``). ``exclude_questions``: problems whose text is in this set
    are left out (logged), e.g. to derive a train split disjoint from MATH500.

    Raises DataFormatError on a malformed line, a missing ``problem`` field, a row with
    neither ``solution`` nor ``answer``, or a non-string field.
    """
    if on_unusable not in ("drop", "error", "keep"):
        raise ValueError("on_unusable must be 'drop', 'error' or 'keep'")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    split = _split_name(path, split)
    excluded = set(exclude_questions)
    dropped: dict[str, list[int]] = {
        "empty 'answer' field": [],
        "no 'answer' field and no \\boxed{} in 'solution'": [],
        "question in the excluded set": [],
    }
    out: list[Problem] = []
    total = 0
    if limit == 0:
        return out
    for index, (line, row) in enumerate(iter_jsonl(path)):
        total += 1
        question = _require_str(row, "problem", path, line)
        has_solution, has_answer = "solution" in row, "answer" in row
        if not has_solution and not has_answer:
            raise DataFormatError(path, line, f"missing field 'solution' or 'answer' (fields: {sorted(row)})")
        solution = _require_str(row, "solution", path, line) if has_solution else None
        if has_answer:
            answer = _require_str(row, "answer", path, line, allow_empty=True).strip()
            reason = "empty 'answer' field"
        else:
            answer = (last_boxed(solution or "") or "").strip()
            reason = "no 'answer' field and no \\boxed{} in 'solution'"
        if question.strip() in excluded:
            dropped["question in the excluded set"].append(line)
            continue
        if not answer:
            if on_unusable == "error":
                raise DataFormatError(path, line, f"unusable row: {reason}")
            if on_unusable == "drop":
                dropped[reason].append(line)
                continue
        subject = row.get("subject", row.get("type"))
        meta = {
            "split": split,
            "line": line,
            "source": str(path),
            "level": _parse_level(row.get("level")),
            "level_raw": row.get("level"),
            "subject": subject if isinstance(subject, str) else None,
        }
        for extra in ("unique_id", "idx"):
            if extra in row:
                meta[extra] = row[extra]
        out.append(
            Problem(
                id=f"math-{split}-{index:05d}",
                question=question.strip(),
                answer=answer,
                solution=solution.strip() if solution is not None else None,
                task="math",
                meta=meta,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    _log_drops(path, dropped, total, expected=("question in the excluded set",))
    return out


# --------------------------------------------------------------------------------------
# Named splits
# --------------------------------------------------------------------------------------


def _normalize_name(name_or_path: str, split: str | None) -> str:
    name = name_or_path.strip()
    if ":" not in name and name in DEFAULT_EVAL_SPLIT:
        name = f"{name}:{split or DEFAULT_EVAL_SPLIT[name]}"
    elif split and ":" in name:
        raise ValueError(f"give the split once: {name_or_path!r} already names one, split={split!r}")
    return ALIASES.get(name, name)


def is_named_split(name: str) -> bool:
    """Whether ``name`` is a split :func:`load_dataset` knows by name (``"math:test5000"``, ``"gsm8k"``),
    not a file path."""
    return not _looks_like_path(name) and _normalize_name(name, None) in available_splits()


def _looks_like_path(s: str) -> bool:
    return s.endswith((".jsonl", ".json")) or "/" in s or os.sep in s


def detect_format(path: PathLike) -> str:
    """``"gsm8k"`` (question/answer) or ``"math"`` (problem/...) from the first row."""
    for line, row in iter_jsonl(path):
        if isinstance(row, dict) and "question" in row and "answer" in row:
            return "gsm8k"
        if isinstance(row, dict) and "problem" in row:
            return "math"
        raise DataFormatError(
            path,
            line,
            f"cannot tell the format: expected 'question'+'answer' (GSM8K) or 'problem' (MATH), got {sorted(row) if isinstance(row, dict) else type(row).__name__}",
        )
    raise DataFormatError(path, None, "empty file")


def _check_file_task(path: str, fmt: str, task: str | None) -> None:
    """A file's row format must suit the task that grades it: GSM8K-format rows hold a `####` solution,
    MATH-format rows LaTeX answers, and each task's grader and prompts read only its own."""
    if task is None:
        return
    if fmt == "gsm8k" and task == "math":
        raise DataFormatError(path, 1, "task math reads MATH-format rows ('problem' with 'solution' or 'answer'), "
                                       "this file has GSM8K-format rows ('question'/'answer'): set task=gsm8k, "
                                       "or write the rows as 'problem'/'answer'")
    if fmt == "math" and task != "math":
        raise DataFormatError(path, 1, f"task {task} reads GSM8K-format rows ('question'/'answer'), this file "
                                       "has MATH-format rows ('problem'): set task=math, or write the rows as "
                                       "'question'/'answer'")


def load_dataset(
    name_or_path: str,
    split: str | None = None,
    *,
    data_dir: PathLike | None = None,
    limit: int | None = None,
    task: str | None = None,
    arith_seed: int = 0,
    arith_config: Any = None,
    arith_hard_config: Any = None,
) -> list[Problem]:
    """Load a named split (``"gsm8k:test"``, or ``("gsm8k", "test")``) or a JSONL file.

    Args:
      name_or_path: ``"<task>:<split>"``, a bare task name with ``split`` (or its default
        eval split: gsm8k:test, math:math500, arith:test), or a path to a JSONL file
        (format detected from its fields; ``task`` may say ``"arith"`` for GSM8K-format
        arith files).
      split: the split when ``name_or_path`` is a bare task name.
      data_dir: the data root (else ``$ALPHALLM_DATA_DIR`` or the defaults).
      limit: at most this many problems.
      arith_seed, arith_config, arith_hard_config: the arith generator's seed and
        configs (defaults: seed 0, ``arith.DEFAULT_CONFIG``, ``arith.HARD_CONFIG``).
    """
    if (_looks_like_path(name_or_path) and ":" not in name_or_path.split("/")[0]) or name_or_path.startswith("gs://"):
        fmt = detect_format(name_or_path)
        _check_file_task(name_or_path, fmt, task)
        if fmt == "gsm8k":
            return load_gsm8k(name_or_path, limit, split=split, task=task or "gsm8k")
        return load_math(name_or_path, limit, split=split)

    name = _normalize_name(name_or_path, split)
    split_task = name.split(":", 1)[0]
    known = name in ARITH_SPLITS or name in NAMED_FILES or name in ("gsm8k:train_dev", "math:train_dev",
                                                                    "math:train4500")
    if known and task is not None and (split_task == "math") != (task == "math"):
        # The grader and the prompts' stops follow the task: MATH answers graded as numbers (or GSM8K's
        # as LaTeX) would be wrong with no error.
        raise ValueError(f"the split {name} is {split_task}'s and the task (config key `task`) is {task!r}: "
                         f"set task={split_task!r}, or choose a {task} split")
    if name in ARITH_SPLITS:
        from alphallm_jax.data import arith

        splits = _arith_splits(
            arith_seed,
            arith_config or arith.DEFAULT_CONFIG,
            arith_hard_config or arith.HARD_CONFIG,
        )
        probs = splits[name.split(":", 1)[1]]
        return list(probs[:limit] if limit is not None else probs)
    if name in NAMED_FILES:
        fmt, rel = NAMED_FILES[name]
        path = resolve_data_dir(data_dir) / rel
        sp = name.split(":", 1)[1]
        if fmt == "gsm8k":
            return load_gsm8k(path, limit, split=sp)
        return load_math(path, limit, split=sp)
    if name in ("gsm8k:train_dev", "math:train_dev"):
        train = load_dataset(name.replace("train_dev", "train"), data_dir=data_dir)
        tail = train[-HELD_OUT_DEV:]
        return tail[:limit] if limit is not None else tail
    if name == "math:train4500":
        root = resolve_data_dir(data_dir)
        math500 = load_math(root / NAMED_FILES["math:math500"][1], split="math500")
        return load_math(
            root / NAMED_FILES["math:test5000"][1],
            limit,
            split="train4500",
            exclude_questions={p.question for p in math500},
        )
    raise ValueError(
        f"unknown dataset {name_or_path!r} (split={split!r}); known: {', '.join(available_splits())}, "
        "or a path to a .jsonl file"
    )


@functools.lru_cache(maxsize=4)
def _arith_splits(seed: int, config: Any, hard_config: Any) -> dict[str, tuple[Problem, ...]]:
    from alphallm_jax.data import arith

    splits = arith.make_splits(seed, config=config, hard_config=hard_config)
    return {k: tuple(v) for k, v in splits.items()}
