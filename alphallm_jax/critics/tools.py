"""Tool-augmented checks for the ORM: a safe calculator and sympy-backed equation checks for MATH.

The calculator has its own tokenizer and recursive-descent parser for numbers (integers, decimals,
thousands separators), `+ - * /` (and `× ÷ −`), unary signs, parentheses and postfix `%`. Arithmetic
is exact (`fractions.Fraction`), so `3/4` is a fraction and `0.1+0.2=0.3` holds. Anything else
(names, calls, `**`, `^`, brackets, letters) is a parse error: model text is data and is never
handed to `eval`/`exec`. Sizes are bounded (characters, tokens, nesting, digits, intermediate bit
lengths), so no input can make it run long.

What a solution is checked for:
  * every GSM8K calculator annotation `<<expr=result>>`: `expr` evaluates to `result`, and a number
    written right after `>>` equals it;
  * every written equation `a op b = c` in the text (annotations removed): both sides parse and are
    equal. A side that is not arithmetic (`x = 5`, `50% of 20 = 10`) is not an equation and is skipped;
  * MATH (`task="math"`): equations inside `$...$`, `\\[...\\]`, `\\(...\\)` whose sides are purely
    numeric LaTeX are compared with math-verify's sympy-based equivalence, which runs in the grading
    module's worker processes under a wall-clock budget (`data.grading.math_verify_verdict`), never on
    this thread; only a definite difference fails (a timeout or a side it cannot parse is unchecked).
  * with `question_numbers`, a complete solution whose question is known: every number the question
    states is an operand of some calculation (annotation or written equation), as often as stated;
  * with `operand_sources`, a complete or partial solution whose question is known: every operand of
    every calculation is a number the question gives (digits or a number word) or an earlier result.
A result written with fewer decimals than the exact value is accepted when it is the exact value
rounded to the written precision (`10/3=3.33`).

`combine_with_checks` folds the checks into the ORM score by config (`product`, `mix`, `min`, `none`);
with `steps`, the search folds the checks of a state's text into its value and PRM the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

MAX_EXPR_CHARS = 256
MAX_TOKENS = 96
MAX_DEPTH = 24
MAX_NUMBER_DIGITS = 30
MAX_BITS = 2048  # numerator/denominator size of any intermediate value

COMBINE_MODES = ("none", "product", "mix", "min")

_NUMBER_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")
# The en dash is a minus sign in many hand-written solutions (`5/5 – 1/5 = 4/5`).
_OPERATORS = {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "−": "-", "–": "-", "·": "*"}
_DIGITS = frozenset("0123456789")
_SKIPPED = frozenset(" \t$")  # spaces and currency signs carry no arithmetic
# Characters an arithmetic run in running text may contain (used to find written equations).
_RUN_CHARS = _DIGITS | frozenset(".,()%$ \t") | frozenset(_OPERATORS)
_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
# The result written after an annotation: a number, a fraction (`<<3/4=3/4>>3/4`) or a percentage
# (`<<10/50=20%>>20%`, whose annotation reads 20% as 0.2).
_WRITTEN_AFTER_RE = re.compile(
    r"\s*\$?\s*(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?:/(\d+)(?!\d|\.\d)|[ \t]*(%))?")
_LIST_MARK_RE = re.compile(r"[.)][ \t]")
# `x` (or `X`) between two operands on one line is a multiplication sign: `60 x 60/100 = 36` reads as
# `60*60/100`. (Nothing here looks across a newline, so checking line chunks equals checking the text.)
_TIMES_X_RE = re.compile(r"(?<=[\d)])[ \t]*[xX][ \t]*(?=\$?[ \t]*[\d(])")
# Text that continues an expression leftwards past what the written-equation scan can read: an operator
# word (`half of 10 + 2 = 7`, `3 times 4 + 1 = 13`, `60 students x 2/3 = 40`); and, before a
# parenthesis, a number or a closing parenthesis (an implicit product, `2(3+4)=14`).
_CONTINUED_LEFT_RE = re.compile(r"\b(?:of|times|by|plus|minus|over|x)[ \t]*\$?[ \t]*\Z", re.IGNORECASE)
_ENDS_AT_OPERAND_RE = re.compile(r"[\d)][ \t]*\Z")
# A chunk must not end where an annotation's number may follow on the next line (`<<2*2=4>>\n4`).
_ENDS_AT_ANNOTATION_RE = re.compile(r">>\s*\$?\s*$")
# Text that ends in a word or a closing bracket: an operator right after it continues a quantity written with
# its unit (`10 points + 14 + 6 = 30`, `40 marbles - 3 - 5 = 32`, `M + 4 + 2 = 8`) or an expression
# (`(2x - 135) + 90 + 60 = 360`).
_ENDS_AT_WORD_RE = re.compile(r"[A-Za-z)\]}!][ \t]*\$?[ \t]*\Z")
# One letter glued to the right side's number, then no letter: an algebraic term (`100/5 = 5A/5`).
_VARIABLE_AFTER_RE = re.compile(r"[A-Za-z](?![A-Za-z])")
# A left side glued to what precedes it (a power `x^2-25=0`, a subscript `a_2+3=7`, a variable or function
# `f(5)-5=2`, a closing bracket, `!`), or just after a LaTeX command (`3 \cdot 4 + 1 = 13`), is the tail of a
# larger expression the scan cannot read. A longer word glued to it is a missing space (`because20-3 = 17`).
_GLUED_BEFORE_RE = re.compile(r"(?:(?<![A-Za-z\\])[A-Za-z]|[\^_}\])!|]|\\[A-Za-z]+[ \t]*)\Z")
# Likewise a right side whose number goes on as a power, subscript, factorial, implicit product or LaTeX
# product, or a repeating decimal (`= 2^3`, `= 5(2)`, `= 4 \cdot 3`, `= 1,\!000`, `= 0.\overline{3}`).
_GLUED_AFTER_RE = re.compile(
    r"[\^_{(!]|[ \t]*\\(?:cdot|times|div|[dt]?frac|sqrt|pi|binom)(?![A-Za-z])|\.?\\[,!;:]|\.\\")
# A mixed number written with a word: `4 / 3 = 1 and 1/3`.
_AND_FRACTION_AFTER_RE = re.compile(r"[ \t]+and[ \t]+\(?\d+[ \t]*/[ \t]*\d+")
_CLOCK_BEFORE_RE = re.compile(r"\d:\Z")  # `6:00+48=6:48`: a time of day, not a sum


class CalcError(ValueError):
    """The text is not an arithmetic expression the calculator accepts (never executed either way)."""


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str  # "num" | "op" | "(" | ")" | "%" | "junk"
    text: str
    value: Fraction | None = None
    start: int = -1  # its offset in the scanned text


def _number(text: str) -> Fraction:
    digits = text.replace(",", "")
    if sum(ch in _DIGITS for ch in digits) > MAX_NUMBER_DIGITS:
        raise CalcError(f"number with more than {MAX_NUMBER_DIGITS} digits")
    return Fraction(digits)  # a decimal string: exact


def scan(text: str, *, lenient: bool = False) -> list[Token]:
    """Tokens of `text`. Unknown characters raise CalcError, or become `junk` tokens when lenient."""
    if len(text) > MAX_EXPR_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _SKIPPED:
            i += 1
            continue
        m = _NUMBER_RE.match(text, i) if (ch in _DIGITS or ch == ".") else None
        if m:
            tokens.append(Token("num", m.group(), _number(m.group()), i))
            i = m.end()
        elif text.startswith("//", i):  # floor division, as some generated annotations write it
            tokens.append(Token("op", "//", start=i))
            i += 2
        elif ch in _OPERATORS:
            tokens.append(Token("op", _OPERATORS[ch], start=i))
            i += 1
        elif ch in "()%":
            tokens.append(Token(ch, ch, start=i))
            i += 1
        elif lenient:
            tokens.append(Token("junk", ch, start=i))
            i += 1
        else:
            raise CalcError(f"unexpected character {ch!r} at {i}")
        if len(tokens) > MAX_TOKENS:
            raise CalcError(f"more than {MAX_TOKENS} tokens")
    return tokens


def _checked(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise CalcError("intermediate value too large")
    return x


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := ('+'|'-') unary | primary '%'*; primary := NUMBER | '(' expr ')'. '//' is floor division."""

    def __init__(self, tokens: Sequence[Token]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise CalcError("unexpected end of expression")
        self.i += 1
        return tok

    def parse(self) -> Fraction:
        if not self.tokens:
            raise CalcError("empty expression")
        value = self.expr()
        if self.peek() is not None:
            raise CalcError(f"unexpected {self.peek().text!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while (tok := self.peek()) is not None and tok.kind == "op" and tok.text in "+-":
            self.take()
            rhs = self.term()
            value = _checked(value + rhs if tok.text == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (tok := self.peek()) is not None and tok.kind == "op" and tok.text in ("*", "/", "//"):
            self.take()
            rhs = self.unary()
            if tok.text == "*":
                value = _checked(value * rhs)
            else:
                if rhs == 0:
                    raise CalcError("division by zero")
                value = _checked(value / rhs if tok.text == "/" else Fraction(math.floor(value / rhs)))
        return value

    def unary(self) -> Fraction:
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text in "+-":
            self.take()
            with self._nested():
                value = self.unary()
            return -value if tok.text == "-" else value
        value = self.primary()
        while (tok := self.peek()) is not None and tok.kind == "%":
            self.take()
            value = value / 100
        return value

    def primary(self) -> Fraction:
        tok = self.take()
        if tok.kind == "num":
            return tok.value
        if tok.kind == "(":
            with self._nested():
                value = self.expr()
            if self.take().kind != ")":
                raise CalcError("missing ')'")
            return value
        raise CalcError(f"unexpected {tok.text!r}")

    def _nested(self):
        parser = self

        class _Depth:
            def __enter__(self):
                parser.depth += 1
                if parser.depth > MAX_DEPTH:
                    raise CalcError(f"nesting deeper than {MAX_DEPTH}")

            def __exit__(self, *exc):
                parser.depth -= 1

        return _Depth()


def evaluate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError for anything else."""
    return _Parser(scan(expr)).parse()


def _decimals(text: str) -> int | None:
    text = text.strip().replace(",", "")
    if "." in text and re.fullmatch(r"-?\d*\.\d+", text):
        return len(text.split(".")[1])
    return None


def values_match(exact: Fraction, written: Fraction, written_text: str = "", rel_tol: float = 0.0) -> bool:
    """`written` equals `exact`, or is `exact` rounded to the decimals `written_text` shows."""
    if exact == written:
        return True
    places = _decimals(written_text)
    if places is not None and abs(exact - written) <= Fraction(1, 2 * 10 ** places):
        return True
    return rel_tol > 0 and abs(exact - written) <= Fraction(rel_tol) * max(abs(exact), Fraction(1))


@dataclasses.dataclass
class CheckResult:
    """What the tools found in one text: `ok` when no check failed."""

    checked: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def merge(self, other: CheckResult) -> CheckResult:
        return CheckResult(self.checked + other.checked, self.failures + other.failures)


def check_annotations(text: str, rel_tol: float = 0.0) -> CheckResult:
    """Re-computes every `<<expr=result>>` and compares the number written right after it."""
    result = CheckResult()
    for m in _ANNOTATION_RE.finditer(text):
        body = m.group(1)
        result.checked += 1
        parts = body.split("=")
        if len(parts) < 2:
            result.failures.append(f"annotation without '=': <<{body}>>")
            continue
        try:
            values = [evaluate(p) for p in parts]
        except CalcError as e:
            result.failures.append(f"unreadable annotation <<{body}>>: {e}")
            continue
        if not all(values_match(values[0], v, p, rel_tol) for v, p in zip(values[1:], parts[1:])):
            result.failures.append(f"wrong annotation <<{body}>>: {parts[0].strip()} = {_fmt(values[0])}")
            continue
        after = _WRITTEN_AFTER_RE.match(text, m.end())
        if after is not None and "\n" in text[m.end():after.start(1)] and _LIST_MARK_RE.match(text, after.end(1)):
            after = None  # the next line's list numeral (`<<2*3=6>>\n2. Then ...`), not the result
        if after is not None:
            try:
                written = [_number(after.group(1))]
                if after.group(2) is not None and _number(after.group(2)) != 0:  # or the fraction it begins
                    written.append(written[0] / _number(after.group(2)))
                if after.group(3) is not None:  # or the percentage it writes (`<<10/50=20%>>20%`)
                    written.append(written[0] / 100)
            except CalcError as e:  # model text: a number too long to read fails the check, never the caller
                result.failures.append(f"<<{body}>> followed by an unreadable number: {e}")
                continue
            if not any(values_match(values[-1], w, after.group(1), rel_tol) for w in written):
                result.failures.append(f"<<{body}>> followed by {after.group(1)}")
    return result


def _run_bounds(text: str, eq: int) -> tuple[int, int]:
    """[start, end) of the arithmetic-looking characters around the '=' at index eq."""
    start = eq
    while start > 0 and text[start - 1] in _RUN_CHARS and eq - start < MAX_EXPR_CHARS:
        start -= 1
    end = eq + 1
    while end < len(text) and text[end] in _RUN_CHARS and end - eq < MAX_EXPR_CHARS:
        end += 1
    return start, end


def _parse_tokens(tokens: Sequence[Token]) -> Fraction | None:
    if not tokens or any(t.kind == "junk" for t in tokens):
        return None
    try:
        return _Parser(tokens).parse()
    except CalcError:
        return None


def _tokens_text(tokens: Sequence[Token]) -> str:
    return "".join(t.text for t in tokens)


def _divided_by_fraction(tokens: Sequence[Token]) -> Fraction | None:
    """`a / b/c` divided by the fraction b/c: where the spacing groups it so (wider around the first
    slash than around the second: `25 / 1/3 = 75`, `2/ 1/5 = 10`), or spaced evenly where b/c is a
    proper fraction of whole numbers (`14 / 1 / 4 = 56`, `14/1/4 = 56`); None for any other form."""
    if [t.kind for t in tokens] != ["num", "op", "num", "op", "num"] or tokens[1].text != "/" \
            or tokens[3].text != "/":
        return None
    b, c = tokens[2].value, tokens[4].value
    if b == 0 or c == 0:
        return None

    def gap(i):  # the spaces around the slash tokens[i]
        return tokens[i + 1].start - (tokens[i - 1].start + len(tokens[i - 1].text)) - 1

    proper = b.denominator == c.denominator == 1 and b < c
    if gap(1) < gap(3) or (gap(1) == gap(3) and not proper):
        return None
    return tokens[0].value / (b / c)


def _percent_as_unit(tokens: Sequence[Token]) -> Fraction | None:
    """The value of a left side whose `%` is a unit, read without it: `100%` (a ratio written as a
    percentage, `1.2 x 100% = 120`) and a divisor in percent (an amount per percentage point,
    `$7500/75% = $100`); None when it has neither."""
    at = [i for i in range(1, len(tokens)) if tokens[i].kind == "%" and tokens[i - 1].kind == "num"
          and (tokens[i - 1].value == 100 or (i >= 2 and tokens[i - 2].text == "/"))]
    return _parse_tokens([t for i, t in enumerate(tokens) if i not in at]) if at else None


def _written_equations(text: str):
    """(lhs tokens, lhs value, rhs tokens, rhs value, other readings) of every `a op b = c` written in
    running text (annotations removed first); other readings: (lhs, rhs) pairs that also count as right.

    The left side is the longest arithmetic suffix before '=' with at least two numbers (so `x = 5`
    or `half of 20 = 10` are not equations); the right side is the longest arithmetic prefix after it.
    Other readings: a left side grouped by its spacing (`_divided_by_fraction`), one that writes a ratio
    as a percentage (`_percent_as_unit`), and in a chain
    (`2*3 = 6 - 1 = 5`, a running calculation) the right side's first number.
    """
    plain = _TIMES_X_RE.sub("*", _ANNOTATION_RE.sub("", text))
    for eq in (i for i, ch in enumerate(plain) if ch == "="):
        start, end = _run_bounds(plain, eq)
        try:
            left = scan(plain[start:eq], lenient=True)
            right = scan(plain[eq + 1:end], lenient=True)
        except CalcError:
            continue
        lhs = lhs_tokens = None
        for k in range(len(left)):
            if sum(t.kind == "num" for t in left[k:]) < 2:
                break
            lhs = _parse_tokens(left[k:])
            if lhs is not None:
                lhs_tokens = left[k:]
                break
        if lhs is None:
            continue
        lhs_at = start + lhs_tokens[0].start
        before = plain[:lhs_at]
        if (k > 0 and left[k - 1].kind in ("op", "num")) or _CONTINUED_LEFT_RE.search(before) \
                or (lhs_tokens[0].kind == "(" and _ENDS_AT_OPERAND_RE.search(before)) \
                or (lhs_tokens[0].kind == "op" and _ENDS_AT_WORD_RE.search(before)) \
                or _CLOCK_BEFORE_RE.search(before) or _GLUED_BEFORE_RE.search(before):
            # The left side is the tail of a longer expression: an operator whose other operand is not
            # arithmetic (`72 cubic ft * 3/4 = 54`), an operator word (`60 students x 2/3 = 40`, `half
            # of 10 + 2 = 7`), an implicit product (`2(3+4)=14`), a number just before it (the rest of
            # a mixed number, `8 x 1 1/2 = 12`, or of one grouped by spaces, `17 000/5 = 3 400`) or a
            # quantity written with its unit (`10 points + 14 + 6 = 30`), or a power, subscript or LaTeX
            # term (`x^2-25=0`, `a_2+3=7`).
            continue
        if lhs_tokens[0].text == "-" and not before.rpartition("\n")[2].strip() \
                and plain[lhs_at + 1:lhs_at + 2].isspace():
            # A list bullet (`- 3 * 4 = 12` at a line's start), not a minus sign.
            lhs_tokens = lhs_tokens[1:]
            lhs = _parse_tokens(lhs_tokens) if sum(t.kind == "num" for t in lhs_tokens) >= 2 else None
            if lhs is None:
                continue
        rhs = rhs_tokens = None
        for k in range(len(right), 0, -1):
            rhs = _parse_tokens(right[:k])
            if rhs is not None:
                rhs_tokens = right[:k]
                break
        if rhs is None:
            continue
        if k < len(right) and right[k].kind in ("num", "op"):
            # A mixed number (`= 1 1/2`), one grouped by spaces (`= 3 400`), or an expression that goes
            # on into words (`= 30 + M trees`): the right side is not read whole.
            continue
        rhs_end = eq + 1 + rhs_tokens[-1].start + len(rhs_tokens[-1].text)
        if rhs_tokens[-1].kind == "num" and _VARIABLE_AFTER_RE.match(plain, rhs_end):
            continue  # the right side is an algebraic term (`100/5 = 5A/5`), not a number
        if _AND_FRACTION_AFTER_RE.match(plain, rhs_end):
            continue  # `= 1 and 1/3`
        if rhs_tokens[-1].kind in ("num", ")") and _GLUED_AFTER_RE.match(plain, rhs_end):
            continue  # `= 2^3`, `= 5(2)`: the right side goes on past what the scan reads
        readings = []
        grouped = _divided_by_fraction(lhs_tokens)
        if grouped is not None:
            readings.append((grouped, rhs))
        as_percent = _percent_as_unit(lhs_tokens) if rhs_tokens[-1].kind != "%" else None
        if as_percent is not None:
            readings.append((as_percent, rhs))
        if plain.startswith("=", end) and len(rhs_tokens) > 1 and rhs_tokens[0].kind == "num":
            readings.append((lhs, rhs_tokens[0].value))  # a chain: `a op b = c op d = e`
        yield lhs_tokens, lhs, rhs_tokens, rhs, tuple(readings)


def check_written_equations(text: str, rel_tol: float = 0.0) -> CheckResult:
    """Checks every `a op b = c` equation written in running text (see `_written_equations`)."""
    result = CheckResult()
    for lhs_tokens, lhs, rhs_tokens, rhs, readings in _written_equations(text):
        result.checked += 1
        rhs_text = _tokens_text(rhs_tokens)
        # A right side in percent: the left side's value in percent (`100 - 50 = 50%`), or its ratio
        # as a rounded percentage (`9/27*100% = 33.333%`).
        percent = rhs_tokens[-1].kind == "%" and any(
            values_match(a, rhs * 100, rhs_text.rstrip("%"), rel_tol) for a in (lhs, lhs * 100))
        # Another reading's right side is a bare number: no decimals of the written side apply.
        if not (values_match(lhs, rhs, rhs_text, rel_tol) or percent
                or any(values_match(a, b, "", rel_tol) for a, b in readings)):
            result.failures.append(f"wrong equation {_tokens_text(lhs_tokens)}={rhs_text}: "
                                   f"left side is {_fmt(lhs)}")
    return result


def stated_numbers(text: str) -> Counter:
    """Every number written in `text` (digits, decimals, thousands separators), counted by value."""
    return Counter(dict(_stated_numbers(text)))


@functools.lru_cache(maxsize=1 << 12)
def _stated_numbers(text: str) -> tuple[tuple[Fraction, int], ...]:
    """`stated_numbers`, memoised (a search checks every complete solution against its question)."""
    found: Counter = Counter()
    for m in _NUMBER_RE.finditer(text):
        try:
            found[_number(m.group())] += 1
        except CalcError:
            continue
    return tuple(found.items())


def calculation_operands(text: str) -> Counter:
    """The numbers on the left of every calculation in `text`, counted by value: each annotation's
    expression and each written equation's left side. `2*2=<<2*2=4>>4` writes one calculation twice,
    so the two sources are merged by the larger count, not added."""
    annotated: Counter = Counter()
    written: Counter = Counter()
    for chunk in line_chunks(text):  # no calculation spans two chunks
        calculations, _ = _chunk_calculations(chunk)
        for kind, _, operands in calculations:
            (annotated if kind == "annotation" else written).update(operands)
    return annotated | written


@functools.lru_cache(maxsize=1 << 16)
def _chunk_calculations(chunk: str) -> tuple[tuple[tuple[str, str, tuple[Fraction, ...]], ...], frozenset[Fraction]]:
    """((kind, text, operands) of every annotation and written equation, the numbers they write as
    results) of one `line_chunks` chunk, memoised like `_check_chunk`: a search's complete solutions
    share their earlier lines."""
    calculations, results = [], set()
    for m in _ANNOTATION_RE.finditer(chunk):
        parts = m.group(1).split("=")
        try:
            operands = tuple(t.value for t in scan(parts[0], lenient=True) if t.kind == "num")
        except CalcError:
            continue
        calculations.append(("annotation", f"<<{m.group(1)}>>", operands))
        for part in parts[1:]:
            try:
                results.update(t.value for t in scan(part, lenient=True) if t.kind == "num")
            except CalcError:
                continue
    for lhs_tokens, _, rhs_tokens, rhs, _ in _written_equations(chunk):
        calculations.append(("equation", f"{_tokens_text(lhs_tokens)}={_tokens_text(rhs_tokens)}",
                             tuple(t.value for t in lhs_tokens if t.kind == "num")))
        results.add(rhs)
    return tuple(calculations), frozenset(results)


def check_question_numbers(question: str, solution: str) -> CheckResult:
    """Every number the question states is an operand of some calculation of the solution, as often as
    the question states it. Arith questions are built so that every number is used; GSM8K's reference
    solutions pass 71.5% of the time (numbers written as words, distractors, a number used in an
    unannotated step), so the check is a per-task setting (`critics.tools.question_numbers`)."""
    unused = stated_numbers(question) - calculation_operands(solution)
    if not unused:
        return CheckResult(1, [])
    listed = ", ".join(f"{_fmt(v)}" + (f" (x{n})" if n > 1 else "") for v, n in sorted(unused.items()))
    return CheckResult(1, [f"question numbers never used in a calculation: {listed}"])


# Numbers a question may give in words (arith's "half", GSM8K's "twice", "a dozen"): a calculation may use
# them as if they were written in digits.
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "twice": 2, "double": 2, "doubles": 2, "half": 2, "halves": 2,
    "triple": 3, "triples": 3, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4, "dozen": 12,
    "dozens": 12, "percent": 100, "%": 100,
}
_WORD_RE = re.compile(r"[a-z]+|%")


@functools.lru_cache(maxsize=1 << 12)
def given_numbers(question: str) -> frozenset[Fraction]:
    """The numbers `question` gives: written in digits, or as number words (`half` is 2)."""
    words = {Fraction(_NUMBER_WORDS[w]) for w in _WORD_RE.findall(question.lower()) if w in _NUMBER_WORDS}
    return frozenset(v for v, _ in _stated_numbers(question)) | words


def check_operand_sources(question: str, text: str) -> CheckResult:
    """Every operand of every calculation in `text` (a complete or partial solution) is a number the
    question gives (`given_numbers`) or a result written by a calculation of the same or an earlier line:
    a number from nowhere is a misread question. Right for tasks whose solutions need no outside
    constants (arith); GSM8K's use them (60 minutes, 7 days), so the check is a per-task setting
    (`critics.tools.operand_sources`)."""
    available = set(given_numbers(question))
    result = CheckResult()
    for chunk in line_chunks(text):
        calculations, results = _chunk_calculations(chunk)
        available |= results  # a line may chain its own results: `2*5=10, 10+3=13`
        for _, expr, operands in calculations:
            result.checked += 1
            stray = [v for v in operands if v not in available]
            if stray:
                listed = ", ".join(_fmt(v) for v in stray)
                result.failures.append(f"{expr} uses {listed}: neither a number of the question nor an "
                                       f"earlier result")
    return result


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x} (~{float(x):.6g})"


# ------------------------------------------------------------------------------------ MATH (sympy)

_MATH_SEGMENT_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
# LaTeX that keeps a side purely numeric; any other command or letter makes it symbolic (skipped).
_NUMERIC_LATEX_COMMANDS = ("\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\cdot", "\\times", "\\div", "\\left",
                           "\\right", "\\!", "\\,", "\\;", "\\pi")
# No `_`: a subscript on a number is its base (`010_2=2_8`), which math-verify does not read. No `*`: in MATH
# it is an operation the problem defines (`2 * 6 = 2^6 + 6^2`).
_NUMERIC_LATEX_CHARS = frozenset("0123456789.+-/^{}()[] ")
# Numeric LaTeX that math-verify misreads: a power written without braces over two digits or a command
# (`2^43^4` is 2^4 3^4 in LaTeX, `2^10` a slip for 2^{10}; `64^\frac{1}{3}` reads as 1/3), an odd root of a
# negative number (sympy's principal root is complex: `\sqrt[3]{-8}`).
_MISREAD_LATEX_RE = re.compile(r"\^\s*(?:\d[\d.]|\\)|\\sqrt\s*\[[^\]]*\]\s*\{\s*-")
# Sentence punctuation (and spacing) after a side: `$4+5=9.$` ends a sentence, it is no decimal point; `..`
# is an ellipsis, a truncated decimal (`419.999844...`).
_TRAILING_PUNCTUATION_RE = re.compile(r"(?:[\s.,;:]|\\[,;!])+\Z")
# A decimal, which a second reading writes as an exact fraction (see `check_latex_equations`).
_DECIMAL_RE = re.compile(rf"(?<![\d.])(\d{{0,{MAX_NUMBER_DIGITS}}})\.(\d{{1,{MAX_NUMBER_DIGITS}}})(?![\d.])")
# An operand followed by a bracket is a product (`2(5)-3`, `12(20)`, `(2)(5)`), which math-verify reads as a
# mixed number's sum (`2(5)` is 7) unless the product is written out.
_IMPLICIT_PRODUCT_RE = re.compile(r"(\d|[)\]}]|\\pi(?![A-Za-z]))\s*(?=\\left\s*[(\[]|[(\[])")


def _split_top_level_equals(expr: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in expr:
        if ch in "{(":
            depth += 1
        elif ch in "})":
            depth -= 1
        if ch == "=" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def is_numeric_latex(side: str) -> bool:
    s = side.replace("&", "")
    for cmd in _NUMERIC_LATEX_COMMANDS:
        s = s.replace(cmd, " ")
    s = s.strip()
    return bool(s) and any(ch in _DIGITS for ch in s) and all(ch in _NUMERIC_LATEX_CHARS for ch in s)


def _latex_side(text: str) -> str | None:
    """One side of an `=` in a math segment, without its sentence punctuation; None where it is not numeric
    or math-verify would misread it."""
    side = text.replace("&", "").strip()
    if ".." in side:
        return None
    side = _TRAILING_PUNCTUATION_RE.sub("", side)
    return side if is_numeric_latex(side) and not _MISREAD_LATEX_RE.search(side) else None


def numeric_latex_equations(text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) pairs of consecutive numeric sides of `=` chains inside LaTeX math segments."""
    pairs = []
    for m in _MATH_SEGMENT_RE.finditer(text):
        segment = next(g for g in m.groups() if g is not None)
        # Lines end at `\\`; a newline is a space in LaTeX, inside an expression too (`3\times\n6=18`).
        for line in re.split(r"\\\\", segment.replace("\n", " ")):
            sides = [_latex_side(s) for s in _split_top_level_equals(line)]
            for a, b in zip(sides, sides[1:]):
                if a is not None and b is not None and a != b:
                    pairs.append((a, b))
    return pairs


def check_latex_equations(text: str, *, max_checks: int = 8, budget_s: float = 20.0) -> CheckResult:
    """Numeric LaTeX equations compared by math-verify (sympy) in the grading worker processes.

    Each comparison has the grading module's wall-clock budget; at most `max_checks` equations and
    `budget_s` seconds per text. Only a definite "the sides differ" fails: equations left unchecked, and
    those math-verify cannot tell (a timeout, a side it cannot parse), count as passing, not as checked.
    """
    from alphallm_jax.data.grading import math_verify_verdict

    result = CheckResult()
    deadline = time.monotonic() + budget_s
    for lhs, rhs in numeric_latex_equations(text)[:max_checks]:
        if time.monotonic() > deadline:
            break
        verdict = math_verify_verdict(_explicit_products(rhs), _explicit_products(lhs))
        if verdict is False and any(_DECIMAL_RE.search(side) for side in (lhs, rhs)):
            # math-verify's floats can miss an exact equality (`10000 \cdot 0.07 = 700`); its float reading
            # still accepts a rounded result (`\sqrt{2} = 1.414214`), so either reading may pass.
            verdict = math_verify_verdict(_exact_decimals(_explicit_products(rhs)),
                                          _exact_decimals(_explicit_products(lhs)))
        if verdict is None:
            continue
        result.checked += 1
        if not verdict:
            result.failures.append(f"sympy: {lhs} != {rhs}")
    return result


def _explicit_products(side: str) -> str:
    """`side` with its implicit products written with `\\cdot` (`2(5)-3` -> `2\\cdot (5)-3`)."""
    return _IMPLICIT_PRODUCT_RE.sub(lambda m: m.group(1) + "\\cdot ", side)


def _exact_decimals(side: str) -> str:
    """`side` with its decimals written as fractions (`0.07` -> `(\\frac{7}{100})`)."""
    return _DECIMAL_RE.sub(lambda m: f"(\\frac{{{int(m.group(1) + m.group(2))}}}{{{10 ** len(m.group(2))}}})", side)


# ------------------------------------------------------------------------------------- combined


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """Which checks run and how they fold into the ORM (fields of the `critics.tools` config)."""

    enabled: bool = True
    combine: str = "product"  # none | product | mix | min
    penalty: float = 0.05  # product: the ORM is multiplied by this when a check fails
    mix_weight: float = 0.5  # mix: (1 - w) * orm + w * ok
    annotations: bool = True
    written_equations: bool = True
    latex: bool = True  # MATH only
    rel_tol: float = 0.0
    max_latex_checks: int = 8
    latex_budget_s: float = 20.0
    # Also fold the checks of a search state's text (the solution so far) into its value and PRM, so a
    # step with a wrong calculation is scored down when it is written, not only through its rollouts' ORM.
    steps: bool = False
    # Complete solutions only: every number of the question is used by some calculation
    # (`check_question_numbers`). Right for tasks whose questions hold no spare numbers (arith).
    question_numbers: bool = False
    # Complete and partial solutions: every operand is a number of the question or an earlier result
    # (`check_operand_sources`). Right for tasks whose solutions need no outside constants (arith).
    operand_sources: bool = False

    @property
    def needs_question(self) -> bool:
        """Whether a check reads the question (the scorer then decodes each prompt's)."""
        return self.enabled and (self.question_numbers or self.operand_sources)

    def question_of(self, prompt: str) -> str:
        """The question that `operand_sources` and `question_numbers` read, from a plain or fewshot prompt
        (`data.prompts.question_of_prompt`); a prompt without one (a chat prompt, a prompts file's free
        text) raises, naming its start, so a configured check is never skipped in silence."""
        from alphallm_jax.data.prompts import QUESTION_PREFIX, question_of_prompt

        question = question_of_prompt(prompt)
        if question is None:
            raise ValueError(f"critics.tools.question_numbers and critics.tools.operand_sources read the question "
                             f"after {QUESTION_PREFIX!r} in a plain or fewshot prompt, and this prompt has none: "
                             f"{prompt[:120]!r}. Turn those checks off, or use data.prompt_format 'plain' or "
                             f"'fewshot'")
        return question

    def __post_init__(self):
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"critics.tools.combine={self.combine!r}; choose from {COMBINE_MODES}")

    @classmethod
    def from_config(cls, section) -> ToolConfig:
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown critics.tools fields: {sorted(set(d) - known)}")
        return cls(**d)


def line_chunks(text: str) -> list[str]:
    """`text` cut after newlines that no check looks across: every annotation and written equation lies
    inside one chunk (equation runs stop at newlines; a chunk never ends inside `<<...` or right after
    `>>`), so checking the chunks one by one finds exactly what checking the whole text finds."""
    chunks, start = [], 0
    for i, ch in enumerate(text):
        if ch != "\n":
            continue
        head = text[start:i]
        if head.rfind("<<") > head.rfind(">>") or _ENDS_AT_ANNOTATION_RE.search(head):
            continue
        chunks.append(text[start:i + 1])
        start = i + 1
    if start < len(text) or not chunks:
        chunks.append(text[start:])
    return chunks


@functools.lru_cache(maxsize=1 << 16)
def _check_chunk(chunk: str, rel_tol: float, annotations: bool, written_equations: bool
                 ) -> tuple[tuple[int, tuple[str, ...]], tuple[int, tuple[str, ...]]]:
    """(checked, failures) of the annotation and the written-equation checks of one chunk, memoised: a
    search checks every state's text, whose earlier lines are its parent's."""
    ann = check_annotations(chunk, rel_tol) if annotations else CheckResult()
    eqs = check_written_equations(chunk, rel_tol) if written_equations else CheckResult()
    return (ann.checked, tuple(ann.failures)), (eqs.checked, tuple(eqs.failures))


def check_solution(text: str, task: str, cfg: ToolConfig = ToolConfig(), question: str | None = None,
                   *, complete: bool = True) -> CheckResult:
    """Every enabled check on one solution (or one step) text. `question`, where known, enables the checks
    that read it: `operand_sources`, and for a `complete` solution `question_numbers` (a partial one has
    not used every number yet)."""
    result = CheckResult()
    if not cfg.enabled:
        return result
    if cfg.annotations or cfg.written_equations:
        per_chunk = [_check_chunk(c, cfg.rel_tol, cfg.annotations, cfg.written_equations)
                     for c in line_chunks(text)]
        for kind in (0, 1):  # every annotation finding first, then every equation's, as in the text
            for found in per_chunk:
                result = result.merge(CheckResult(found[kind][0], list(found[kind][1])))
    if cfg.latex and task == "math":
        result = result.merge(check_latex_equations(text, max_checks=cfg.max_latex_checks,
                                                    budget_s=cfg.latex_budget_s))
    if cfg.operand_sources and question is not None:
        result = result.merge(check_operand_sources(question, text))
    if cfg.question_numbers and question is not None and complete:
        result = result.merge(check_question_numbers(question, text))
    return result


def check_solutions(texts: Sequence[str], task: str, cfg: ToolConfig = ToolConfig(),
                    questions: Sequence[str | None] | None = None, *, complete: bool = True) -> list[CheckResult]:
    """`check_solution` over many texts (`questions[i]`: text i's question, None where unknown; `complete`:
    all are complete solutions); MATH texts run concurrently (their sympy work is in worker processes, so
    threads only wait)."""
    if questions is None:
        questions = [None] * len(texts)
    if len(questions) != len(texts):
        raise ValueError(f"{len(questions)} questions for {len(texts)} solution texts")
    if task != "math" or len(texts) < 2 or not (cfg.enabled and cfg.latex):
        return [check_solution(t, task, cfg, q, complete=complete) for t, q in zip(texts, questions)]
    from concurrent.futures import ThreadPoolExecutor

    from alphallm_jax.data.grading import math_verify_config

    with ThreadPoolExecutor(max_workers=math_verify_config().workers) as ex:
        return list(ex.map(lambda tq: check_solution(tq[0], task, cfg, tq[1], complete=complete),
                           zip(texts, questions)))


def combine_with_checks(score: np.ndarray, tool_ok: np.ndarray, cfg: ToolConfig = ToolConfig()) -> np.ndarray:
    """A critic probability (the ORM; with `steps`, a state's value or PRM) folded with its text's
    checks: a score in [0, 1]."""
    score = np.asarray(score, np.float32)
    ok = np.asarray(tool_ok, np.float32)
    if not cfg.enabled or cfg.combine == "none":
        return score
    if cfg.combine == "product":
        return score * np.where(ok > 0, 1.0, cfg.penalty).astype(np.float32)
    if cfg.combine == "mix":
        return ((1.0 - cfg.mix_weight) * score + cfg.mix_weight * ok).astype(np.float32)
    return np.minimum(score, ok)
