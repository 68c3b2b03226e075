"""Is a sampled text a well-formed question? One named reason per rejected text, checked in order.

A synthesized prompt is used without a label, so a malformed one costs a whole search and can teach the
policy nonsense: the checks are strict and cheap (no model calls).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Rejection reasons, in the order they are checked (the counts record keeps this order).
REASONS = ("truncated", "too_short", "too_long", "answer_leak", "degenerate", "no_question", "several_questions",
           "no_number", "ungrounded", "unknown_words", "large_number")

# A sentence ends at `.`, `!` or `?` and a space, but not after a title or a Latin abbreviation, nor
# after a dotted acronym or a unit that the sentence goes on from (a lower-case word or a digit next:
# "How much did Mr. Benson pay?", "the P.T.O. spent", "1,500 sq. ft. bigger" are one sentence each;
# "... weighs 10 lbs. How many ...?" are two). Math (`$...$`) is masked first (`_sentences`).
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b(?:Mr|Ms|Dr|St|Jr|Sr|vs)\.)(?<!\bMrs\.)(?<!\b(?:e\.g|i\.e)\.)"
                           r"(?!(?:(?<=\b(?:sq|ft|oz|lb|hr)\.)|(?<=\b(?:lbs|hrs)\.)|(?<=[A-Z]\.[A-Z]\.))\s+[a-z0-9])\s+")
# Math between dollar signs, never across a sentence end: in a word problem `$` is money ("costs $3000
# per month. Calculate ... at $3.55.").
_MATH_SPAN = re.compile(r"\$(?:(?![.!?]\s+[A-Z])[^$])*\$")
_WORD = re.compile(r"[A-Za-z]+")
_TOKEN = re.compile(r"\w+")
_NUMBER = re.compile(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|(?:thir|four|fif|six|"
                     r"seven|eigh|nine)teen|(?:twen|thir|for|fif|six|seven|eigh|nine)ty|hundred|thousand|million|half|"
                     r"twice|thrice|double|triple|dozens?|quarter|third)\b", re.IGNORECASE)
# A question may also end with an instruction sentence ("Calculate the total.", "Find x."), or a clause
# ("If she worked 50 hours, calculate her income.", "If the tank is 18 inches tall, at what time ...").
_CLAUSE_START = r"(?:^|,\s+)(?:then\s+)?(?:(?:at|in|by|for|on|to|of)\s+(?=(?:what|which|how)\b))?"
_INSTRUCTION = re.compile(_CLAUSE_START + r"(?:calculate|compute|find|determine|what|how|express|evaluate|give|"
                          r"write)\b", re.IGNORECASE)
# A sentence asks when it ends with `?` or holds a "how many/much" that no verb reports ("she calculates
# how many cakes are left", "he wonders how much water he uses" ask nothing).
_HOW = re.compile(r"\bhow (?:many|much)\b", re.IGNORECASE)
_REPORTED_HOW = re.compile(r"\b(?:calculat(?:es|ed|ing)|count(?:s|ed|ing)|wonder(?:s|ed|ing)|hears|heard|sees|saw|"
                           r"check(?:s|ed)|notic(?:es|ed)|record(?:s|ed)|measur(?:es|ed)|figur(?:es|ed) out|"
                           r"remember(?:s|ed)|realiz(?:es|ed)|learn(?:s|ed)|knows|knew|tells|told)(?: \w+)? "
                           r"how (?:many|much)\b", re.IGNORECASE)
# Notes that may follow the question: a parenthesis ("(There are 128 ounces in a gallon.)", "(24-hr
# time)"), a stated conversion ("There are 1,000 ml in 1 liter."), or how to write the answer ("Round to
# the nearest integer.", "Use L to represent Lottie's earnings."). A note is a whole sentence of at least
# two words, closed by `.` or `)`, with its parentheses balanced, that asks, instructs and answers
# nothing (`_NOT_IN_NOTES`).
_NOTE = re.compile(r"^(?:\(|(?:there (?:are|is)|remember|note|round|use)\b)", re.IGNORECASE)
_NOT_IN_NOTES = re.compile(r"\?|\b(?:how|what|which|calculate|compute|find|determine|evaluate|express|answer|"
                           r"solution|then)\b", re.IGNORECASE)
_CLOSING_QUOTES = "\"'\u201d\u2019"
_WH_WORD = re.compile(r"\b(?:how|what|which|who|whom|whose|when|where|why)\b", re.IGNORECASE)
_AUXILIARY = r"(?:is|are|was|were|does|do|did|can|could|will|would|should|has|have|had)"
_INTERROGATIVE = re.compile(rf"\b(?:how|what|which|who|whom|whose|when|where|why|{_AUXILIARY})\b", re.IGNORECASE)
_STARTS_WITH_AUXILIARY = re.compile(rf"^{_AUXILIARY}\b", re.IGNORECASE)
_ASKED_QUANTITY = re.compile(r"\bhow many ([a-z]+)(?: ([a-z]+))?(?: ([a-z]+))?", re.IGNORECASE)
_NAME = re.compile(r"(?<!^)(?<![.!?] )\b[A-Z][a-z]+\b")
INTEGER = re.compile(r"(?<![\d.,])\d+(?!\d|[.,]\d)")  # a whole number, not part of a decimal or 1,000
# Any written quantity, thousands separators and decimals included (`90,000`, `12.5`), for the size limit.
QUANTITY = re.compile(r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class FormRules:
    min_chars: int = 20
    max_chars: int = 600
    min_words: int = 5
    # Text that belongs to a solution, a second prompt or a chat turn, never to a question.
    banned: tuple[str, ...] = ("####", "<<", "Answer:", "Question:", "\\boxed")
    # GSM8K-style: the last sentence asks ("How ...?") or instructs ("Calculate the total.").
    require_question_mark: bool = True
    max_questions: int = 1  # sentences that ask ("?", "how many/much"); more: several questions in one
    require_number: bool = True  # word problems need quantities, in digits or words (MATH may have none)
    max_repeats: int = 2  # a word 5-gram occurring more often than this is a sampling loop
    # Word problems: the asked quantity ("how many apples") and the names in the asking sentence must
    # appear earlier in the text (a question about something never mentioned cannot be answered).
    require_grounded: bool = True
    # The largest fraction of words never seen in D0 (1.0: no check). A small model trained from scratch
    # misspells words; a pretrained LLM legitimately brings new names and objects.
    max_unknown_words: float = 1.0
    # A question stating a number above this quantile of the numbers D0's questions state is outside the
    # task's range (1.0: no check). The demo's policy answers 45% of its imagined questions whose numbers
    # stay within 10 (D0's 0.97-quantile) and 5% of those with a larger one, which cost as much to search.
    max_number_quantile: float = 1.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | Any) -> FormRules:
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown synthesis.form keys {sorted(unknown)}")
        d["banned"] = tuple(d.get("banned", cls.banned))
        return cls(**d)


def _has_loop(words: Sequence[str], max_repeats: int) -> bool:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - 4):
        gram = tuple(words[i:i + 5])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] > max_repeats:
            return True
    return False


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _sentences(text: str) -> list[str]:
    """`text`'s sentences; a `.` inside math (`Find $p(8).$`) ends none."""
    masked = _MATH_SPAN.sub(lambda m: "$" + "x" * (len(m.group()) - 2) + "$", text.strip())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(masked):
        out.append(text.strip()[start:m.start()])
        start = m.end()
    return out + [text.strip()[start:]]


def _without_notes(sentences: list[str]) -> list[str]:
    """`sentences` up to the last that is no note (`_NOTE`): the question's own, the asking one last."""
    end = len(sentences)
    while end > 1 and _is_note(sentences[end - 1]):
        end -= 1
    return sentences[:end]


def _is_note(sentence: str) -> bool:
    return (_NOTE.match(sentence) is not None and sentence.endswith((".", ")")) and len(_WORD.findall(sentence)) >= 2
            and sentence.count("(") == sentence.count(")") and not _NOT_IN_NOTES.search(sentence))


def _ungrounded(text: str) -> bool:
    """The asking sentence asks "how many X" with none of the next three words mentioned before, or names
    someone never mentioned before."""
    sentences = _sentences(text)
    asking = len(_without_notes(sentences)) - 1  # the notes after it may state what it asks about
    body, ask = " ".join(sentences[:asking] + sentences[asking + 1:]), sentences[asking]
    body_words = {_singular(w.lower()) for w in _WORD.findall(body)}
    for words in _ASKED_QUANTITY.findall(ask):
        phrase = []  # the asked noun phrase: the words before the verb ("how many red apples does ...")
        for w in (w.lower() for w in words if w):
            if _INTERROGATIVE.fullmatch(w):
                break
            phrase.append(w)
        if phrase and not any(_singular(w) in body_words for w in phrase):
            return True
    return any(_singular(name.lower()) not in body_words for name in _NAME.findall(ask))


def vocabulary(texts) -> frozenset[str]:
    """The lower-cased words of `texts` (D0's questions), for `max_unknown_words`."""
    return frozenset(w.lower() for t in texts for w in _WORD.findall(t))


def number_limit(numbers: Sequence[int], rules: FormRules) -> int | None:
    """The largest number a question may state (`rules.max_number_quantile` of D0's stated `numbers`,
    `prompting.stated_numbers`), or None: no limit."""
    if rules.max_number_quantile >= 1.0 or not numbers:
        return None
    ordered = sorted(numbers)
    return ordered[min(len(ordered) - 1, int(rules.max_number_quantile * len(ordered)))]


def form_problem(text: str, rules: FormRules, *, truncated: bool = False,
                 known_words: frozenset[str] = frozenset(), max_number: int | None = None) -> str | None:
    """The first rule `text` breaks (a name in REASONS), or None when it is a well-formed question.

    `truncated`: the sampler stopped at its token cap, so the question may be cut off mid-sentence.
    `known_words`: D0's vocabulary (`vocabulary`), for `rules.max_unknown_words`.
    `max_number`: the largest number it may state (`number_limit`), or None.
    """
    if truncated:
        return "truncated"
    words = _WORD.findall(text)
    if len(text) < rules.min_chars or len(words) < rules.min_words:
        return "too_short"
    if len(text) > rules.max_chars:
        return "too_long"
    if any(b in text for b in rules.banned):
        return "answer_leak"
    if _has_loop([w.lower() for w in _TOKEN.findall(text)], rules.max_repeats):
        return "degenerate"
    if rules.require_question_mark:
        sentences = _without_notes(_sentences(text))
        last = sentences[-1]
        interrogative = _WH_WORD.search(last) is not None or _STARTS_WITH_AUXILIARY.match(last) is not None
        # A sentence may end inside math (`Find $p(8).$`) or a quotation (`her "full face?"`).
        ending = last.rstrip("$").rstrip(_CLOSING_QUOTES)
        asks = (ending.endswith("?") and interrogative) or (
            ending.endswith((".", "?")) and _INSTRUCTION.search(last) is not None)
        if not asks or len(_WORD.findall(last)) < 3:
            return "no_question"
        asking = [x for x in sentences
                  if x.rstrip(_CLOSING_QUOTES).endswith("?") or _HOW.search(_REPORTED_HOW.sub("", x))]
        if len(asking) > rules.max_questions:
            return "several_questions"
    if rules.require_number and not _NUMBER.search(text):
        return "no_number"
    if rules.require_grounded and _ungrounded(text):
        return "ungrounded"
    if rules.max_unknown_words < 1.0 and known_words:
        unknown = sum(w.lower() not in known_words for w in words)
        if unknown > rules.max_unknown_words * len(words):
            return "unknown_words"
    if max_number is not None and any(float(m.group().replace(",", "")) > max_number
                                      for m in QUANTITY.finditer(text)):
        return "large_number"
    return None
