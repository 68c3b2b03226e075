"""Final-answer extraction and grading for GSM8K, MATH and the built-in arith task.

Public API:

* :func:`extract_answer` -- the final answer written in a model solution
  (``#### N``, the last ``\\boxed{}``/``\\fbox{}``, "The answer is X", or the last number).
* :func:`is_correct` -- does a whole model solution reach the reference final answer?
* :func:`answers_equal` -- are two *extracted* answers equivalent (majority voting)?
* :func:`canonical_answer` -- a normalised string key for an extracted answer.
* :func:`parse_number` -- a float from an answer-like string (``"$1,200"``,
  ``"18 dollars"``, ``"3/4"``, ``"-5"``, ``"25%"``, ``"\\frac{3}{4}"``), else ``None``;
  :func:`parse_exact` the same value as an exact ``Fraction`` (what grading compares).

GSM8K and arith are graded numerically, in-process, with no third-party code. MATH is
graded by a cheap normalised string comparison first and then by math-verify
(symbolic/numeric equivalence). math-verify's own timeouts use ``signal.alarm``, which
works only in the main thread and cannot interrupt sympy while it is inside C code (a
huge integer power, for instance). So math-verify runs in a small pool of persistent
worker processes (:mod:`alphallm_jax.data._mathverify_worker`) with a wall-clock budget
per comparison enforced by the caller: a worker that overruns is killed and replaced,
and the comparison grades as False. This works identically from any thread. See
:func:`configure_math_verify`.

Model text is data: nothing here passes it to ``eval``/``exec``; numbers are parsed by
regular expressions and ``float``/``fractions.Fraction``, LaTeX by math-verify's parser.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

log = logging.getLogger(__name__)

NUMERIC_TASKS = ("gsm8k", "arith")
MATH_TASKS = ("math",)

# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the ``}`` matching the ``{`` at ``text[start]``, else None.

    Escaped braces (``\\{``, ``\\}``) do not count.
    """
    assert text[start] == "{"
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def find_boxed(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in order.

    Nested braces are balanced; ``\\boxed 5`` (no braces) yields ``"5"``; a group left
    unclosed (a truncated generation) is not returned.
    """
    out: list[str] = []
    for m in _BOX_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _balanced_group(text, j)
            if end is not None:
                out.append(text[j + 1 : end - 1].strip())
        elif j > m.end():  # "\boxed 5": a single token after whitespace
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                out.append(tok.group(0).rstrip(".,;"))
    return out


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}``/``\\fbox{}``, or ``None``."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)[ \t]*:?[ \t]*([^\n]+)", re.IGNORECASE)
_NUMBER_TOKEN_RE = re.compile(r"(?<![\w.])(-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?)")
_CALC_RE = re.compile(r"<<[^<>\n]*>>")
_UNCLOSED_CALC_RE = re.compile(r"<<[^<>\n]*(?=\n|$)")


def _clean_answer_span(span: str) -> str:
    """Trim an "answer is ..." span to the answer itself."""
    s = span.strip()
    inner = _ANSWER_IS_RE.search(s)  # "Final Answer: The final answer is $x$."
    if inner:
        return _clean_answer_span(inner.group(1))
    if s.startswith("$"):
        # "$5$. I hope it is correct." -> "5"; "$\$18.90$" -> "\$18.90" (an escaped dollar sign is text)
        close = next((m.start() for m in re.finditer(r"(?<!\\)\$", s) if m.start() > 0), -1)
        if close > 0:
            return s[1:close].strip()
    if s.startswith("\\(") and "\\)" in s:
        return s[2 : s.index("\\)")].strip()
    boxed = last_boxed(s)
    if boxed is not None:
        return boxed
    # cut at the end of the sentence (a period followed by space or end)
    m = re.search(r"\.(?:\s|$)", s)
    if m:
        s = s[: m.start()]
    return s.strip().strip("$").strip()


def _numeric_hash_answer(span: str | None) -> str | None:
    """A GSM8K/arith ``#### ...`` line's answer: the line itself when it reads as a number, else its one
    number after markup (``**8**``, ``(8)``, ``The answer is 8``) is removed; else the line as written."""
    if span is None or parse_number(span) is not None:
        return span
    cleaned = _clean_answer_span(span).strip("*_() \t")
    if parse_number(cleaned) is not None:
        return cleaned
    nums = _NUMBER_TOKEN_RE.findall(cleaned)
    return nums[0] if len(nums) == 1 else span


_ANSWER_LEAD_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\b\s*(?:is\b|:|=)?[ \t:]*", re.IGNORECASE)
_HEADING_RE = re.compile(r"[A-Za-z]{2,}")
_NUMBERED_HEADING_RE = re.compile(r"\d{1,2}[.)]\s+[A-Za-z]")


def _hash_line_answer(content: str, task: str) -> str | None:
    """The answer a ``#### ...`` line holds, or None where the line is a markdown heading a model wrote
    (``#### Step 1: Eggs left``, ``#### Final Answer``) rather than the GSM8K answer marker."""
    s = content.strip()
    bare = s.strip("*_ \t")
    if task in NUMERIC_TASKS and _NUMBERED_HEADING_RE.match(bare):
        return None  # "#### 1. Eggs per day", "#### 2) Cost": a numbered heading ("1. Eggs" parses as 1 egg)
    if not s or (task in NUMERIC_TASKS and parse_number(s) is not None):
        return s or None
    lead = _ANSWER_LEAD_RE.match(bare)
    if lead:  # "Answer: 8", "The answer is 8"; a bare "Final Answer" introduces the answer below it
        rest = bare[lead.end():].strip("*_ \t")
        return s if rest and (task not in NUMERIC_TASKS or re.search(r"\d", rest)) else None
    if _HEADING_RE.match(bare) and (task in NUMERIC_TASKS or re.search(r"[\s:]", bare)):
        return None  # starts with words: a heading ("Saturday" alone can be a MATH answer)
    if task in NUMERIC_TASKS and not re.search(r"\d", s):
        return None
    return s


def _cut_unclosed(text: str) -> str:
    """``text`` less a ``\\boxed{`` left unclosed (with everything after it, which is inside it) and any
    ``<<...`` calculator annotation left unclosed on its line: a truncated generation's numbers there are
    not its answer."""
    for m in _BOX_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{" and _balanced_group(text, j) is None:
            text = text[: m.start()]
            break
    return _UNCLOSED_CALC_RE.sub(" ", _CALC_RE.sub(" ", text))


def _extract_raw(text: str, task: str, strict: bool = False) -> str | None:
    hash_answer = None
    # The first "####" line that holds an answer (text after it is run-on); heading lines are skipped.
    for m in _HASH_RE.finditer(text):
        hash_answer = _hash_line_answer(m.group(1), task)
        if hash_answer:
            break
    boxed = last_boxed(text)
    answer_is = None
    for m in _ANSWER_IS_RE.finditer(text):
        cand = _clean_answer_span(m.group(1))
        if cand:
            answer_is = cand
    if task in MATH_TASKS:
        order = (boxed, answer_is, hash_answer)
    else:
        # "The answer is **18**.", "(18)", "18, since 3*6=18": the phrase's one number; a phrase that holds
        # none or several ("To find the answer: we add 10 and 8") names no answer (the last number may).
        answer_is = _numeric_hash_answer(answer_is)
        if answer_is is not None and parse_number(answer_is) is None:
            answer_is = None
        order = (_numeric_hash_answer(hash_answer), boxed, answer_is)
    for cand in order:
        if cand:
            return cand
    if strict:
        return None
    # Fallback: the last number in the text, outside calculator annotations and unclosed boxes.
    nums = _NUMBER_TOKEN_RE.findall(_cut_unclosed(text))
    return nums[-1] if nums else None


def extract_answer(text: str, task: str, *, strict: bool = False) -> str | None:
    """The final answer written in ``text`` (a model solution), or ``None``.

    Order of preference: GSM8K/arith: ``#### N`` (the first one: a model that runs on
    past its answer often starts another problem), the last ``\\boxed{}``,
    "The (final) answer is X", the last number. MATH: the last ``\\boxed{}``/``\\fbox{}``,
    "The (final) answer is X", ``#### X``, the last number. ``strict``: only an answer the solution
    marks as final (``####``, a box, "the answer is") counts, never the last number (the strict-match
    reading of GSM8K evaluations; the default is their flexible one).

    GSM8K/arith answers come back canonical (``"$1,200.00"`` -> ``"1200"``,
    ``"0.750"`` -> ``"0.75"``) when they parse as a number, raw otherwise. MATH answers
    come back as the raw LaTeX found (stripped).
    """
    _check_task(task)
    raw = _extract_raw(text, task, strict)
    if raw is None:
        return None
    if task in NUMERIC_TASKS:
        value = parse_exact(raw)
        return format_exact(value) if value is not None else raw.strip()
    return raw.strip()


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------

_UNIT_TAIL = r"(?:[A-Za-z][A-Za-z'\-]*(?:\s+[A-Za-z][A-Za-z'\-]*)*)"
_NUMBER_RE = re.compile(
    r"^(?P<sign>[-+])?\s*(?:\\\$|\$|USD\s*)?\s*(?P<sign2>[-+])?"
    r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d*)?|\.\d+))?"
    r"\s*(?P<pct>%|percent\b)?"
    rf"\s*(?P<unit>{_UNIT_TAIL})?"
    r"\s*[.!]?$"
)
_FRAC_RE = re.compile(
    r"^(?P<sign>-)?\s*\\[dt]?frac\s*\{\s*(?P<a>-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<b>\d+(?:\.\d+)?)\s*\}$"
)
_FRAC_SHORT_RE = re.compile(r"^(?P<sign>-)?\s*\\[dt]?frac(?P<a>\d)(?P<b>\d)$")


def _strip_number_decorations(s: str) -> str:
    s = s.strip().replace("\u2212", "-").replace("\u2013", "-")
    s = s.strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r" \1", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;:! ]", "", s)
    s = s.replace("\\%", "%").replace("\\$", "$")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\u00b0", "")
    s = re.sub(r"^[A-Za-z]\w{0,2}\s*=\s*(?=[-+$\\.\d])", "", s)  # "x = 5" -> "5"
    # thousands separators: only proper groups of three digits
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return s.strip()


# No answer has more digits; and Python refuses int <-> str conversions past 4300 digits.
_MAX_DIGITS = 1000


def parse_exact(s: str | None, *, units: bool = True) -> Fraction | None:
    """:func:`parse_number`'s value as an exact ``Fraction`` (every answer it reads is a rational), or
    ``None``: answers compare exactly, so that ``-\\frac{2010012}{2010013}`` is not ``-1``."""
    if s is None:
        return None
    t = _strip_number_decorations(str(s))
    if not t or sum(c.isdigit() for c in t) > _MAX_DIGITS:
        return None
    m = _FRAC_RE.match(t) or _FRAC_SHORT_RE.match(t)
    if m:
        a, b = Fraction(m.group("a")), Fraction(m.group("b"))
        if b == 0:
            return None
        value = a / b
        return -value if m.group("sign") else value
    m = _NUMBER_RE.match(t)
    if not m or (m.group("unit") and not units) or (not units and t.endswith("!")):
        return None  # units=False (MATH): "6!" is a factorial, not an exclamation
    if m.group("sign") and m.group("sign2"):
        return None
    try:
        value = Fraction(m.group("num"))
        if m.group("den") is not None:
            den = Fraction(m.group("den"))
            if den == 0:
                return None
            value = value / den
    except (ValueError, ZeroDivisionError):
        return None
    return -value if (m.group("sign") or m.group("sign2")) == "-" else value


def parse_number(s: str | None, *, units: bool = True) -> float | None:
    """Parse an answer-like string as one number, or return ``None``.

    Accepts a sign, ``$``/``\\$``, thousands commas, decimals (``18.00``), a fraction
    ``a/b`` or ``\\frac{a}{b}``/``\\dfrac``, a trailing ``%`` (the value is kept: ``"25%"``
    -> 25.0), trailing unit words (``"18 dollars"``, ``"5 apples"``; with ``units=False``
    none: a normalised MATH answer has dropped its ``\\text{ units}``, and letters left
    after a number are mathematics, ``3i`` or ``5x``), ``^\\circ`` and a trailing period.
    Anything with a second number or other symbols is ``None``: this parses answers, it
    does not evaluate expressions. :func:`parse_exact` gives the exact value.
    """
    value = parse_exact(s, units=units)
    if value is None:
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def format_number(x: float) -> str:
    """Canonical text for a number: ``18.0`` -> ``"18"``, ``0.75`` -> ``"0.75"``."""
    if math.isfinite(x) and abs(x - round(x)) < 1e-9 and abs(x) < 1e15:
        return str(int(round(x)))
    return f"{x:.6f}".rstrip("0").rstrip(".")


def format_exact(q: Fraction) -> str:
    """Exact canonical text for a rational: ``"18"``, ``"-0.75"``, or ``"1/3"`` where the decimal does not end
    (a key that keeps apart values :func:`format_number`'s six places would merge)."""
    if q.denominator == 1:
        return str(q.numerator)
    rest, places = q.denominator, 0
    for p in (2, 5):
        n = 0
        while rest % p == 0:
            rest //= p
            n += 1
        places = max(places, n)
    if rest != 1:
        return f"{q.numerator}/{q.denominator}"
    whole, frac = divmod(abs(q.numerator) * 10**places // q.denominator, 10**places)
    return f"{'-' if q < 0 else ''}{whole}.{frac:0{places}d}".rstrip("0")


# --------------------------------------------------------------------------------------
# MATH normalisation
# --------------------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|operatorname)"


def normalize_math_answer(s: str) -> str:
    """A conservative normal form of a MATH answer for exact string comparison.

    Removes presentation-only LaTeX (``\\left``/``\\right``, thin spaces, ``$``, ``\\%``,
    degrees, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\text{ units}`` at the end,
    ``\\text{X}`` wrappers, spaces, a trailing period), completes ``\\frac12`` and
    ``\\sqrt3``, turns ``a/b`` into ``\\frac{a}{b}``, ``(C)`` into ``C`` and ``x=5`` into
    ``5``. Two answers with equal normal forms are equivalent; unequal ones go on to
    math-verify.
    """
    t = s.strip()
    if t.startswith(("\\boxed", "\\fbox")):
        inner = last_boxed(t)
        if inner is not None:
            t = inner
    t = t.replace("\n", " ")
    t = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", t)
    t = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", t)
    # spacing commands, not the second backslash of a "\\ " row break
    t = re.sub(r"(?<!\\)\\(?:[,;:! ]|quad(?![A-Za-z])|qquad(?![A-Za-z]))", " ", t)
    t = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", t).replace("\u00b0", "")
    t = t.replace("\\$", "").replace("$", "")
    t = t.replace("\\%", "").replace("%", "")
    # units written as "\text{ cm}" (leading space) at the end are dropped
    t = re.sub(_TEXT_CMD + r"\{\s+[^{}]*\}\s*\.?\s*$", "", t)
    t = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", t)
    t = t.replace(" ", "").rstrip(".")
    t = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", t)
    m = re.fullmatch(r"[A-Za-z]\w?=(.+)", t)
    if m and "=" not in m.group(1):
        t = m.group(1)
    t = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", t)
    t = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", t)
    t = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", t)
    t = re.sub(r"\\frac\{((?:[^{}]|\{[^{}]*\})*)\}(\w)", r"\\frac{\1}{\2}", t)  # `\frac{\sqrt{2}}2` too
    m = re.fullmatch(r"(-?\d+)/(\d+)", t)
    if m:
        t = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    m = re.fullmatch(r"\(([A-Ea-e])\)", t)  # multiple choice "(C)" -> "C"
    if m:
        t = m.group(1).upper()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"(-?\d+)\.0+", t)
    if m:
        t = m.group(1)
    return t


# --------------------------------------------------------------------------------------
# math-verify in worker processes
# --------------------------------------------------------------------------------------

_WORKER_PATH = str(Path(__file__).with_name("_mathverify_worker.py"))


@dataclass(frozen=True)
class MathVerifyConfig:
    """How MATH answers are checked with math-verify.

    Attributes:
      timeout_s: wall-clock budget for one comparison (both parses plus verify). A
        worker that overruns is killed; the comparison grades False.
      inner_timeout_s: math-verify's own per-parse/per-compare timeout inside the
        worker (integer seconds, signal-based, in the worker's main thread).
      workers: number of worker processes (concurrent comparisons).
      startup_timeout_s: how long to wait for a fresh worker to import math-verify.
      max_answer_chars: longer extracted answers skip math-verify (graded False unless
        their normal forms match exactly).
    """

    timeout_s: float = 10.0
    inner_timeout_s: int = 3
    workers: int = max(1, min(4, os.cpu_count() or 1))
    startup_timeout_s: float = 60.0
    max_answer_chars: int = 400


_CONFIG = MathVerifyConfig()
_CONFIG_LOCK = threading.Lock()


def configure_math_verify(**kwargs) -> MathVerifyConfig:
    """Update the math-verify settings (fields of :class:`MathVerifyConfig`).

    Changing ``workers`` replaces the worker pool. Returns the new config.
    """
    global _CONFIG, _POOL
    with _CONFIG_LOCK:
        new = replace(_CONFIG, **kwargs)
        if new.workers < 1 or new.timeout_s <= 0 or new.inner_timeout_s < 1:
            raise ValueError(f"invalid math-verify config: {new}")
        if _POOL is not None and new.workers != _CONFIG.workers:
            _POOL.close()
            _POOL = None
        _CONFIG = new
        return new


def math_verify_config() -> MathVerifyConfig:
    return _CONFIG


class _Worker:
    """One persistent math-verify process spoken to over pipes (JSON lines)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # keep BLAS/JAX-style thread pools small in the helper
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_PATH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self._ready = False
        self._next_id = 0
        self.last_error: str | None = None  # the error the last comparison reported, if any

    def _readline(self, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ensure_ready(self, startup_timeout_s: float) -> None:
        if self._ready:
            return
        line = self._readline(time.monotonic() + startup_timeout_s)
        if line is None:
            raise TimeoutError(f"math-verify worker did not start within {startup_timeout_s} s")
        if json.loads(line).get("ready") is not True:
            raise RuntimeError(f"unexpected math-verify worker greeting: {line[:200]!r}")
        self._ready = True

    def compare(self, gold: str, pred: str, inner_timeout_s: int, budget_s: float) -> bool | None:
        """True/False from math-verify, or None when the budget ran out."""
        assert self.proc.stdin is not None
        self._next_id += 1
        req = {"id": self._next_id, "gold": gold, "pred": pred, "timeout": inner_timeout_s}
        self.proc.stdin.write((json.dumps(req) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        deadline = time.monotonic() + budget_s
        while True:
            line = self._readline(deadline)
            if line is None:
                return None
            resp = json.loads(line)
            if resp.get("id") == self._next_id:
                self.last_error = resp.get("error")
                if resp.get("error"):
                    log.debug("math-verify error: %s", resp["error"])
                return bool(resp.get("ok"))

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class _Slot:
    __slots__ = ("worker",)

    def __init__(self) -> None:
        self.worker: _Worker | None = None


class _WorkerPool:
    """``size`` slots; a slot starts its worker lazily and restarts it after a kill."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self._slots: queue.Queue[_Slot] = queue.Queue()
        self._all = [_Slot() for _ in range(size)]
        for s in self._all:
            self._slots.put(s)
        self.closed = False

    def compare(self, gold: str, pred: str, cfg: MathVerifyConfig) -> bool:
        return self.verdict(gold, pred, cfg) is True

    def verdict(self, gold: str, pred: str, cfg: MathVerifyConfig) -> bool | None:
        """math-verify's answer, or None where a False may only mean it could not tell: the worker failed
        twice, overran the wall-clock budget, reported an error, or took math-verify's own timeout (which
        answers False)."""
        slot = self._slots.get()
        try:
            for attempt in range(2):
                if slot.worker is None:
                    slot.worker = _Worker()
                w = slot.worker
                try:
                    w.ensure_ready(cfg.startup_timeout_s)
                except (EOFError, OSError, ValueError, TimeoutError) as e:
                    w.kill()
                    slot.worker = None
                    raise RuntimeError(
                        f"the math-verify worker could not start ({e}); is math-verify installed for {sys.executable}?"
                    ) from e
                try:
                    started = time.monotonic()
                    result = w.compare(gold, pred, cfg.inner_timeout_s, cfg.timeout_s)
                except (EOFError, BrokenPipeError, OSError, ValueError) as e:
                    log.warning("math-verify worker failed (%s); restarting it", e)
                    w.kill()
                    slot.worker = None
                    if attempt == 0:
                        continue
                    return None
                if result is None:
                    log.warning(
                        "math-verify exceeded %.1f s on an answer of %d chars; killing the worker and grading it False",
                        cfg.timeout_s,
                        len(pred),
                    )
                    w.kill()
                    slot.worker = None
                    return None
                if not result and (w.last_error or time.monotonic() - started >= cfg.inner_timeout_s):
                    return None
                return result
            return None
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        self.closed = True
        if os.getpid() != self.pid:
            return  # a forked child must not kill its parent's workers
        for s in self._all:
            if s.worker is not None:
                s.worker.close()
                s.worker = None


_POOL: _WorkerPool | None = None


def _pool() -> _WorkerPool:
    global _POOL
    with _CONFIG_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _WorkerPool(_CONFIG.workers)
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None:
        _POOL.close()


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two LaTeX answers, under the configured budget.

    Safe from any thread; never hangs longer than ``timeout_s`` (plus a one-off worker
    start-up); returns False on timeout or error.
    """
    cfg = _CONFIG
    if len(pred) > cfg.max_answer_chars or len(gold) > cfg.max_answer_chars:
        return False
    return _pool().compare(gold, pred, cfg)


def math_verify_verdict(pred: str, gold: str) -> bool | None:
    """:func:`math_verify_equal` that tells "not equal" from "could not tell": True or False where
    math-verify decided, None where it could not (an answer too long, out of time, a worker failure or
    error, or a side it cannot read as a value). For checks where only a definite False may count.
    """
    cfg = _CONFIG
    if len(pred) > cfg.max_answer_chars or len(gold) > cfg.max_answer_chars:
        return None
    pool = _pool()
    verdict = pool.verdict(gold, pred, cfg)
    if verdict is not False:
        return verdict
    # math-verify compares what it cannot parse as strings (`9.` against `9`: False): a side it reads as a
    # value equals itself in parentheses.
    for side in (gold, pred):
        if pool.verdict(f"({side})", side, cfg) is not True:
            return None
    return False


# --------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------


def _check_task(task: str) -> None:
    if task not in NUMERIC_TASKS + MATH_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {NUMERIC_TASKS + MATH_TASKS}")


def canonical_answer(answer: str | None, task: str) -> str | None:
    """A normalised key for an extracted answer (for vote counting and caching)."""
    _check_task(task)
    if answer is None:
        return None
    if task in NUMERIC_TASKS:
        v = parse_exact(answer)
        return format_exact(v) if v is not None else answer.strip()
    norm = normalize_math_answer(answer)
    v = parse_exact(norm, units=False)
    return format_exact(v) if v is not None else norm


def _math_answers_equal(pred: str, ref: str, use_math_verify: bool = True) -> bool:
    if not pred.strip() or not ref.strip():
        return False
    np_, nr = normalize_math_answer(pred), normalize_math_answer(ref)
    if np_ and np_ == nr:
        return True
    if re.fullmatch(r"[A-Za-z]{2,}", np_) and re.fullmatch(r"[A-Za-z]{2,}", nr):
        return np_.lower() == nr.lower()
    vp, vr = parse_exact(np_, units=False), parse_exact(nr, units=False)
    if vp is not None and vr is not None:
        return vp == vr  # exact: a near-miss is wrong (math-verify agrees: -1 is not -2010012/2010013)
    if not use_math_verify:
        return False
    return math_verify_equal(pred, ref)


def answers_equal(pred_answer: str | None, ref_answer: str | None, task: str) -> bool:
    """Whether two extracted final answers are equivalent for ``task``."""
    _check_task(task)
    if pred_answer is None or ref_answer is None:
        return False
    if task in NUMERIC_TASKS:
        vp, vr = parse_exact(pred_answer), parse_exact(ref_answer)
        if vp is not None and vr is not None:
            return vp == vr
        return bool(pred_answer.strip()) and pred_answer.strip() == ref_answer.strip()
    return _math_answers_equal(pred_answer, ref_answer)


def vote_keys(answers: Sequence[str | None], task: str) -> list[str | None]:
    """Majority-vote keys of extracted answers: :func:`canonical_answer`, merged by
    :func:`merge_equivalent_keys` (for MATH, `\\sqrt{2}/2` and `\\frac{\\sqrt{2}}{2}` share one key)."""
    return merge_equivalent_keys([canonical_answer(a, task) for a in answers], task)


def merge_equivalent_keys(keys: Sequence[str | None], task: str) -> list[str | None]:
    """Canonical answer keys with equivalent MATH answers written differently mapped to the key of the
    first of them, as :func:`answers_equal` (math-verify) judges; numbers already compare exactly through
    their keys, so other tasks' keys come back unchanged. Each distinct key is compared with the distinct
    keys before it (math-verify only where neither the normalised strings nor exact numbers decide)."""
    if task not in MATH_TASKS:
        return list(keys)
    merged: dict[str, str] = {}
    for key in keys:
        if key is None or key in merged:
            continue
        merged[key] = next((rep for rep in dict.fromkeys(merged.values()) if answers_equal(key, rep, task)), key)
    return [None if k is None else merged[k] for k in keys]


def is_correct(prediction: str, reference: str, task: str, *, strict: bool = False) -> bool:
    """Whether the model solution ``prediction`` reaches the final answer ``reference``.

    ``reference`` is a final answer (``Problem.answer``), not a solution. GSM8K/arith:
    numeric comparison after :func:`parse_number` (commas, ``$``, units, ``18.00``,
    fractions, negatives, percentages). MATH: normalised string match, then
    math-verify (fractions vs decimals, tuples, intervals, reordered terms,
    ``\\dfrac``/``\\frac``, ``\\text{}`` units, degrees) under a timeout. ``strict``: the answer must be
    marked as final (see :func:`extract_answer`).
    """
    _check_task(task)
    pred = extract_answer(prediction, task, strict=strict)
    return answers_equal(pred, reference, task)


def grade_batch(predictions: list[str], references: list[str], task: str) -> list[bool]:
    """:func:`is_correct` over aligned lists; MATH comparisons run concurrently on the
    math-verify worker pool (one thread per worker), numeric tasks run inline."""
    _check_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if task in NUMERIC_TASKS or len(predictions) < 2:
        return [is_correct(p, r, task) for p, r in zip(predictions, references, strict=True)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=_CONFIG.workers) as ex:
        return list(ex.map(lambda pr: is_correct(pr[0], pr[1], task), zip(predictions, references, strict=True)))
