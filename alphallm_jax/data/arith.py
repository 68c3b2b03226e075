"""The built-in reference task: GSM8K-style arithmetic word problems from templates.

Each problem is a short story about one person and one running quantity (pencils,
cookies, stamps, apples, dollars, km, pages). The story starts with a given amount or a
product ("buys 3 packs of 12 pencils"), goes through events (gain, loss, a product
gained or lost, a fraction given away) and may end with a terminal question that
divides, multiplies or subtracts from a total ("packs them into boxes of 4. How many
boxes ...?"). Every arithmetic step is one solution line, a short sentence with a
GSM8K calculator annotation, and the last line is ``#### N``::

    Mia buys 3 packs of 12 pencils, so she has 3*12=<<3*12=36>>36 pencils.
    She gives 5 to Tom, so she has 36-5=<<36-5=31>>31 pencils left.
    #### 31

All values are integers in ``[value_min, value_max]``; division only happens when it is
exact; every number written in a question (except a trip/book total, bounded by
``value_max``) is at most ``operand_max``, and small factors (bags, friends, days) at
most ``factor_max``. Generation is deterministic: the same config and seed give the same
problems and byte-identical files. Text is built only from the templates below, so the
vocabulary stays small (a few hundred words) for a tiny sentencepiece model.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from alphallm_jax.data.problems import Problem
from alphallm_jax.utils.io import PathLike, as_path, atomic_write_json, write_jsonl_atomic

EVENT_TYPES = ("gain", "loss", "gain_product", "loss_product", "loss_fraction", "terminal")
START_TYPES = ("given", "product")

# --------------------------------------------------------------------------------------
# Vocabulary and templates
# --------------------------------------------------------------------------------------

NAMES_HE = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Ryan", "Omar")
NAMES_SHE = ("Anna", "Mia", "Lily", "Emma", "Zoe", "Kate", "Sara", "Nina")
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter"}


@dataclass(frozen=True)
class Scenario:
    """Templates for one kind of story.

    Template fields: ``{name}``, ``{friend}``, ``{He}``/``{he}``, ``{His}``/``{his}``,
    ``{him}``, ``{items}``/``{item}``, ``{boxes}``/``{box}`` (a container), the numbers
    ``{a} {b} {k} {m} {frac} {T}``, and in solutions ``{calc}``/``{calc1}``/``{calc2}``
    (``expr=<<expr=value>>value``).

    ``starts``: ``(kind, question, solution)`` with kind ``given`` (no step, solution
    None) or ``product`` (a*b). ``gains``/``losses``: ``(question, solution)`` for +b/-b.
    ``gain_products``/``loss_products``: ``(question, step1, step2)`` for x +/- k*m.
    ``loss_fractions``: ``(question, step1, step2)`` for x - x/d. ``terminals``:
    ``(op, question, solution)``, op ``div`` (x/b), ``mul`` (x*b) or ``rsub`` (T-x); the
    question text ends with the problem's question. ``final``: the closing question when
    the story has no terminal event.
    """

    key: str
    items: tuple[tuple[str, str], ...]
    containers: tuple[tuple[str, str], ...]
    starts: tuple[tuple[str, str, str | None], ...]
    gains: tuple[tuple[str, str], ...]
    losses: tuple[tuple[str, str], ...]
    gain_products: tuple[tuple[str, str, str], ...]
    loss_products: tuple[tuple[str, str, str], ...]
    loss_fractions: tuple[tuple[str, str, str], ...]
    terminals: tuple[tuple[str, str, str], ...]
    final: str


_SHARE_TERMINAL = (
    "div",
    "{He} shares the {items} equally among {b} friends. How many {items} does each friend get?",
    "Each friend gets {calc} {items}.",
)

SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario(
            key="shopping",
            items=(
                ("pencils", "pencil"),
                ("erasers", "eraser"),
                ("stickers", "sticker"),
                ("balloons", "balloon"),
                ("marbles", "marble"),
                ("crayons", "crayon"),
            ),
            containers=(("boxes", "box"), ("packs", "pack"), ("bags", "bag")),
            starts=(
                ("given", "{name} has {a} {items}.", None),
                (
                    "product",
                    "{name} buys {a} {boxes} of {items}. Each {box} has {b} {items}.",
                    "{name} buys {a} {boxes} of {b} {items}, so {he} has {calc} {items}.",
                ),
            ),
            gains=(
                ("Then {he} buys {b} more {items}.", "{He} buys {b} more, so {he} has {calc} {items}."),
                ("{friend} gives {him} {b} {items}.", "{friend} gives {him} {b}, so {he} has {calc} {items}."),
                ("{He} finds {b} {items} in {his} bag.", "{He} finds {b}, so {he} has {calc} {items}."),
            ),
            losses=(
                ("{He} gives {b} {items} to {friend}.", "{He} gives {b} to {friend}, so {he} has {calc} {items} left."),
                ("{He} loses {b} {items}.", "{He} loses {b}, so {he} has {calc} {items} left."),
            ),
            gain_products=(
                (
                    "Then {he} buys {k} {boxes} with {m} {items} in each {box}.",
                    "The {k} {boxes} have {calc1} {items}.",
                    "Now {he} has {calc2} {items}.",
                ),
                (
                    "{friend} gives {him} {k} {boxes} of {items} with {m} in each {box}.",
                    "{friend} gives {him} {calc1} {items}.",
                    "Now {he} has {calc2} {items}.",
                ),
            ),
            loss_products=(
                (
                    "{He} gives {k} friends {m} {items} each.",
                    "{He} gives away {calc1} {items}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            loss_fractions=(
                (
                    "{He} gives {frac} of the {items} to {friend}.",
                    "{He} gives {calc1} {items} to {friend}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            terminals=(
                (
                    "div",
                    "{He} puts the {items} into {boxes} of {b}. How many {boxes} does {he} fill?",
                    "{He} fills {calc} {boxes}.",
                ),
                _SHARE_TERMINAL,
                (
                    "mul",
                    "Each {item} costs {b} dollars. How many dollars are all of {his} {items} worth?",
                    "The {items} are worth {calc} dollars.",
                ),
            ),
            final="How many {items} does {name} have now?",
        ),
        Scenario(
            key="baking",
            items=(
                ("cookies", "cookie"),
                ("muffins", "muffin"),
                ("cupcakes", "cupcake"),
                ("rolls", "roll"),
                ("pies", "pie"),
            ),
            containers=(("trays", "tray"), ("pans", "pan")),
            starts=(
                ("given", "{name} has {a} {items} for a party.", None),
                (
                    "product",
                    "{name} bakes {a} {boxes} of {items}. Each {box} holds {b} {items}.",
                    "{name} bakes {a} {boxes} of {b} {items}, so {he} has {calc} {items}.",
                ),
            ),
            gains=(
                ("Then {he} bakes {b} more {items}.", "{He} bakes {b} more, so {he} has {calc} {items}."),
                ("{friend} brings {him} {b} {items}.", "{friend} brings {b}, so {he} has {calc} {items}."),
            ),
            losses=(
                ("{He} eats {b} of the {items}.", "{He} eats {b}, so {he} has {calc} {items} left."),
                ("{He} gives {b} {items} to {friend}.", "{He} gives {b} to {friend}, so {he} has {calc} {items} left."),
                ("{He} sells {b} {items} at school.", "{He} sells {b}, so {he} has {calc} {items} left."),
            ),
            gain_products=(
                (
                    "Then {he} bakes {k} more {boxes} with {m} {items} on each {box}.",
                    "The new {boxes} have {calc1} {items}.",
                    "Now {he} has {calc2} {items}.",
                ),
            ),
            loss_products=(
                (
                    "{He} gives {m} {items} to each of {k} neighbors.",
                    "{He} gives away {calc1} {items}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            loss_fractions=(
                (
                    "{He} gives {frac} of the {items} to {his} class.",
                    "{He} gives {calc1} {items} to {his} class.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            terminals=(
                (
                    "div",
                    "{He} packs the {items} into boxes of {b}. How many boxes does {he} fill?",
                    "{He} fills {calc} boxes.",
                ),
                (
                    "mul",
                    "{He} sells each {item} for {b} dollars. How many dollars does {he} make?",
                    "{He} makes {calc} dollars.",
                ),
                _SHARE_TERMINAL,
            ),
            final="How many {items} does {name} have now?",
        ),
        Scenario(
            key="collecting",
            items=(
                ("stamps", "stamp"),
                ("shells", "shell"),
                ("cards", "card"),
                ("rocks", "rock"),
                ("buttons", "button"),
            ),
            containers=(("jars", "jar"), ("boxes", "box")),
            starts=(
                ("given", "{name} has {a} {items} in {his} collection.", None),
                (
                    "product",
                    "{name} collects {b} {items} every day for {a} days.",
                    "{He} collects {b} {items} a day for {a} days, so {he} has {calc} {items}.",
                ),
            ),
            gains=(
                ("Then {he} finds {b} more {items}.", "{He} finds {b} more, so {he} has {calc} {items}."),
                ("{friend} gives {him} {b} {items}.", "{friend} gives {him} {b}, so {he} has {calc} {items}."),
            ),
            losses=(
                ("{He} gives {b} {items} to {friend}.", "{He} gives {b} to {friend}, so {he} has {calc} {items} left."),
                ("{He} loses {b} {items}.", "{He} loses {b}, so {he} has {calc} {items} left."),
                ("{He} trades away {b} {items}.", "{He} trades away {b}, so {he} has {calc} {items} left."),
            ),
            gain_products=(
                (
                    "Then {he} collects {m} {items} a day for {k} more days.",
                    "In {k} days {he} collects {calc1} more {items}.",
                    "Now {he} has {calc2} {items}.",
                ),
            ),
            loss_products=(
                (
                    "{He} gives {m} {items} to each of {k} friends.",
                    "{He} gives away {calc1} {items}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            loss_fractions=(
                (
                    "{He} gives {frac} of {his} {items} to {his} sister.",
                    "{He} gives {calc1} {items} to {his} sister.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            terminals=(
                (
                    "div",
                    "{He} puts the {items} in an album with {b} {items} on each page. How many pages does {he} fill?",
                    "{He} fills {calc} pages.",
                ),
                (
                    "div",
                    "{He} puts the {items} into {b} {boxes} with the same number in each. "
                    "How many {items} are in each {box}?",
                    "Each {box} has {calc} {items}.",
                ),
                _SHARE_TERMINAL,
            ),
            final="How many {items} does {name} have now?",
        ),
        Scenario(
            key="farm",
            items=(
                ("apples", "apple"),
                ("oranges", "orange"),
                ("eggs", "egg"),
                ("carrots", "carrot"),
                ("lemons", "lemon"),
            ),
            containers=(("baskets", "basket"), ("crates", "crate")),
            starts=(
                ("given", "{name} picks {a} {items} in the morning.", None),
                (
                    "product",
                    "{name} picks {a} {boxes} of {items}. Each {box} has {b} {items}.",
                    "{name} picks {a} {boxes} of {b} {items}, so {he} has {calc} {items}.",
                ),
            ),
            gains=(
                ("In the afternoon {he} picks {b} more {items}.", "{He} picks {b} more, so {he} has {calc} {items}."),
                ("{friend} brings {him} {b} {items}.", "{friend} brings {him} {b}, so {he} has {calc} {items}."),
            ),
            losses=(
                (
                    "{He} finds that {b} of the {items} are bad and throws them away.",
                    "{He} throws away {b}, so {he} has {calc} {items} left.",
                ),
                ("{He} sells {b} {items} at the market.", "{He} sells {b}, so {he} has {calc} {items} left."),
            ),
            gain_products=(
                (
                    "Then {he} picks {k} {boxes} with {m} {items} in each {box}.",
                    "The {k} {boxes} have {calc1} {items}.",
                    "Now {he} has {calc2} {items}.",
                ),
            ),
            loss_products=(
                (
                    "{He} sells {k} bags with {m} {items} in each bag.",
                    "{He} sells {calc1} {items}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            loss_fractions=(
                (
                    "{He} gives {frac} of the {items} to {friend}.",
                    "{He} gives {calc1} {items} to {friend}.",
                    "So {he} has {calc2} {items} left.",
                ),
            ),
            terminals=(
                (
                    "div",
                    "{He} puts the {items} into bags of {b}. How many bags does {he} fill?",
                    "{He} fills {calc} bags.",
                ),
                (
                    "mul",
                    "{He} sells each {item} for {b} dollars. How many dollars does {he} make?",
                    "{He} makes {calc} dollars.",
                ),
            ),
            final="How many {items} does {name} have now?",
        ),
        Scenario(
            key="saving",
            items=(("dollars", "dollar"),),
            containers=(("weeks", "week"),),
            starts=(
                ("given", "{name} has {a} dollars.", None),
                (
                    "product",
                    "{name} saves {b} dollars every week for {a} weeks.",
                    "{He} saves {b} dollars a week for {a} weeks, so {he} has {calc} dollars.",
                ),
            ),
            gains=(
                (
                    "Then {he} earns {b} dollars for doing chores.",
                    "{He} earns {b} dollars, so {he} has {calc} dollars.",
                ),
                (
                    "{His} grandma gives {him} {b} dollars.",
                    "{His} grandma gives {him} {b} dollars, so {he} has {calc} dollars.",
                ),
            ),
            losses=(
                ("{He} spends {b} dollars on a book.", "{He} spends {b} dollars, so {he} has {calc} dollars left."),
                ("{He} buys a toy for {b} dollars.", "The toy costs {b} dollars, so {he} has {calc} dollars left."),
            ),
            gain_products=(
                (
                    "Then {he} works for {k} hours and earns {m} dollars each hour.",
                    "{He} earns {calc1} dollars.",
                    "Now {he} has {calc2} dollars.",
                ),
                (
                    "{He} sells {k} old books for {m} dollars each.",
                    "{He} gets {calc1} dollars for the books.",
                    "Now {he} has {calc2} dollars.",
                ),
            ),
            loss_products=(
                (
                    "{He} buys {k} books for {m} dollars each.",
                    "The books cost {calc1} dollars.",
                    "So {he} has {calc2} dollars left.",
                ),
            ),
            loss_fractions=(
                (
                    "{He} spends {frac} of {his} money on a gift.",
                    "The gift costs {calc1} dollars.",
                    "So {he} has {calc2} dollars left.",
                ),
            ),
            terminals=(
                (
                    "div",
                    "{He} splits the money equally among {b} friends. How many dollars does each friend get?",
                    "Each friend gets {calc} dollars.",
                ),
                (
                    "div",
                    "Each ticket costs {b} dollars. How many tickets can {he} buy with all of {his} money?",
                    "{He} can buy {calc} tickets.",
                ),
            ),
            final="How many dollars does {name} have now?",
        ),
        Scenario(
            key="travel",
            items=(("km", "km"),),
            containers=(("hours", "hour"),),
            starts=(
                ("given", "{name} rides {his} bike {a} km in the morning.", None),
                (
                    "product",
                    "{name} rides {his} bike at {b} km per hour for {a} hours.",
                    "{He} rides {b} km an hour for {a} hours, so {he} rides {calc} km.",
                ),
            ),
            gains=(
                ("Then {he} rides {b} more km.", "{He} rides {b} more km, so {he} has gone {calc} km."),
                ("After lunch {he} walks {b} km.", "{He} walks {b} km, so {he} has gone {calc} km."),
            ),
            losses=(),
            gain_products=(
                (
                    "Then {he} walks for {k} hours at {m} km per hour.",
                    "{He} walks {calc1} km.",
                    "In all {he} has gone {calc2} km.",
                ),
                (
                    "Then {he} takes a bus for {k} hours at {m} km per hour.",
                    "The bus goes {calc1} km.",
                    "In all {he} has gone {calc2} km.",
                ),
            ),
            loss_products=(),
            loss_fractions=(),
            terminals=(
                (
                    "rsub",
                    "The whole trip is {T} km long. How many km does {he} still have to go?",
                    "{He} still has {calc} km to go.",
                ),
                (
                    "mul",
                    "{He} makes the same trip every day for {b} days. How many km does {he} travel in all?",
                    "In {b} days {he} travels {calc} km.",
                ),
            ),
            final="How many km does {name} travel in all?",
        ),
        Scenario(
            key="reading",
            items=(("pages", "page"),),
            containers=(("days", "day"),),
            starts=(
                ("given", "{name} reads {a} pages of a book on Monday.", None),
                (
                    "product",
                    "{name} reads {b} pages every day for {a} days.",
                    "{He} reads {b} pages a day for {a} days, so {he} reads {calc} pages.",
                ),
            ),
            gains=(
                ("Then {he} reads {b} more pages.", "{He} reads {b} more, so {he} has read {calc} pages."),
                ("On Sunday {he} reads {b} pages.", "{He} reads {b} on Sunday, so {he} has read {calc} pages."),
            ),
            losses=(),
            gain_products=(
                (
                    "Then {he} reads {m} pages a day for {k} more days.",
                    "In {k} days {he} reads {calc1} pages.",
                    "In all {he} has read {calc2} pages.",
                ),
                (
                    "On {his} holiday {he} reads {m} pages each day for {k} days.",
                    "On {his} holiday {he} reads {calc1} pages.",
                    "In all {he} has read {calc2} pages.",
                ),
            ),
            loss_products=(),
            loss_fractions=(),
            terminals=(
                (
                    "rsub",
                    "The book has {T} pages. How many pages are left to read?",
                    "{He} has {calc} pages left to read.",
                ),
            ),
            final="How many pages has {name} read in all?",
        ),
    )
}

# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty and mix knobs of the reference task.

    Attributes:
      min_steps, max_steps: arithmetic steps per problem (uniform in the range).
      operand_min, operand_max: range of the amounts written in a question.
      factor_max: largest small factor (containers, friends, days, divisors).
      value_min, value_max: every intermediate and final value lies in this range.
      scenario_weights: ``((scenario, weight), ...)``; scenarios left out get weight 0;
        empty means all scenarios, equal weights.
      event_weights: ``((event, weight), ...)`` over :data:`EVENT_TYPES`; missing -> 1.
      start_weights: ``((start, weight), ...)`` over :data:`START_TYPES`; missing -> 1.
      seed: default seed of :func:`generate_problems`.
    """

    min_steps: int = 2
    max_steps: int = 4
    operand_min: int = 2
    operand_max: int = 20
    factor_max: int = 6
    value_min: int = 2
    value_max: int = 200
    scenario_weights: tuple[tuple[str, float], ...] = ()
    event_weights: tuple[tuple[str, float], ...] = ()
    start_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 2 <= self.operand_min <= self.operand_max:
            raise ValueError("need 2 <= operand_min <= operand_max")
        if self.factor_max < 2:
            raise ValueError("factor_max must be >= 2")
        if not 1 <= self.value_min < self.value_max:
            raise ValueError("need 1 <= value_min < value_max")
        for name, pairs, allowed in (
            ("scenario_weights", self.scenario_weights, tuple(SCENARIOS)),
            ("event_weights", self.event_weights, EVENT_TYPES),
            ("start_weights", self.start_weights, START_TYPES),
        ):
            for key, w in pairs:
                if key not in allowed:
                    raise ValueError(f"{name}: unknown key {key!r}; expected one of {allowed}")
                if w < 0:
                    raise ValueError(f"{name}: negative weight for {key!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("scenario_weights", "event_weights", "start_weights"):
            d[k] = {key: w for key, w in getattr(self, k)}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArithConfig:
        kw = dict(d)
        for k in ("scenario_weights", "event_weights", "start_weights"):
            if k in kw and isinstance(kw[k], Mapping):
                kw[k] = tuple(sorted((str(a), float(b)) for a, b in kw[k].items()))
        return cls(**kw)


DEFAULT_CONFIG = ArithConfig()
HARD_CONFIG = ArithConfig(min_steps=4, max_steps=6, operand_max=30, factor_max=9, value_max=500)

# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


class _Infeasible(Exception):
    pass


def _calc(expr: str, value: int) -> str:
    return f"{expr}=<<{expr}={value}>>{value}"


def _weighted(rng: random.Random, options: list[str], weights: Mapping[str, float]) -> str:
    ws = [weights.get(o, 1.0) for o in options]
    if sum(ws) <= 0:
        raise _Infeasible("no option with positive weight")
    return rng.choices(options, weights=ws, k=1)[0]


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    if lo > hi:
        raise _Infeasible(f"empty range [{lo}, {hi}]")
    return rng.randint(lo, hi)


@dataclass
class _Story:
    cfg: ArithConfig
    rng: random.Random
    scen: Scenario
    words: dict[str, str]
    x: int = 0
    q_parts: list[str] = field(default_factory=list)
    s_lines: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    used: set = field(default_factory=set)

    def pick(self, options):
        """A template, preferring ones not yet used in this story (no repeated sentences)."""
        fresh = [t for t in options if t not in self.used]
        choice = self.rng.choice(fresh or list(options))
        self.used.add(choice)
        return choice

    def fmt(self, template: str, **nums: Any) -> str:
        return template.format(**self.words, **{k: str(v) for k, v in nums.items()})

    def ok(self, v: int) -> bool:
        return self.cfg.value_min <= v <= self.cfg.value_max

    # ---- starts ------------------------------------------------------------------
    def start(self, kind: str) -> None:
        c, rng = self.cfg, self.rng
        opts = [t for t in self.scen.starts if t[0] == kind]
        _, q, s = rng.choice(opts)
        if kind == "given":
            a = _randint(rng, max(c.operand_min, c.value_min), min(c.operand_max, c.value_max))
            self.x = a
            self.q_parts.append(self.fmt(q, a=a))
        else:
            a = _randint(rng, 2, c.factor_max)
            b = _randint(rng, c.operand_min, min(c.operand_max, c.value_max // a))
            self.x = a * b
            self.q_parts.append(self.fmt(q, a=a, b=b))
            self.s_lines.append(self.fmt(s, a=a, b=b, calc=_calc(f"{a}*{b}", self.x)))
            self.ops.append("*")
        self.events.append(f"start_{kind}")

    # ---- events ------------------------------------------------------------------
    def feasible(self, ev: str) -> bool:
        c, x, sc = self.cfg, self.x, self.scen
        lo = c.operand_min
        if ev == "gain":
            return bool(sc.gains) and x + lo <= c.value_max
        if ev == "loss":
            return bool(sc.losses) and x - lo >= c.value_min
        if ev == "gain_product":
            return bool(sc.gain_products) and x + 2 * lo <= c.value_max
        if ev == "loss_product":
            return bool(sc.loss_products) and x - 2 * lo >= c.value_min
        if ev == "loss_fraction":
            return bool(sc.loss_fractions) and any(
                x % d == 0 and self.ok(x // d) and self.ok(x - x // d) for d in FRACTIONS if d <= c.factor_max
            )
        if ev == "terminal":
            return any(self._terminal_ok(op) for op, _, _ in sc.terminals)
        raise ValueError(ev)

    def _divisors(self) -> list[int]:
        c, x = self.cfg, self.x
        return [b for b in range(2, c.factor_max + 1) if x % b == 0 and self.ok(x // b) and x // b >= 2]

    def _terminal_ok(self, op: str) -> bool:
        c, x = self.cfg, self.x
        if op == "div":
            return bool(self._divisors())
        if op == "mul":
            return x * 2 <= c.value_max and self.ok(x * 2)
        if op == "rsub":
            return x + c.operand_min <= c.value_max
        raise ValueError(op)

    def event(self, ev: str) -> None:
        c, rng, sc, x = self.cfg, self.rng, self.scen, self.x
        if ev == "gain":
            q, s = self.pick(sc.gains)
            b = _randint(rng, c.operand_min, min(c.operand_max, c.value_max - x))
            self._step1(q, s, f"{x}+{b}", x + b, "+", b=b)
        elif ev == "loss":
            q, s = self.pick(sc.losses)
            b = _randint(rng, c.operand_min, min(c.operand_max, x - c.value_min))
            self._step1(q, s, f"{x}-{b}", x - b, "-", b=b)
        elif ev in ("gain_product", "loss_product"):
            room = c.value_max - x if ev == "gain_product" else x - c.value_min
            k = _randint(rng, 2, min(c.factor_max, room // c.operand_min))
            m = _randint(rng, c.operand_min, min(c.operand_max, room // k))
            p = k * m
            q, s1, s2 = self.pick(sc.gain_products if ev == "gain_product" else sc.loss_products)
            self.q_parts.append(self.fmt(q, k=k, m=m))
            self.s_lines.append(self.fmt(s1, k=k, m=m, calc1=_calc(f"{k}*{m}", p)))
            if ev == "gain_product":
                self.x = x + p
                self.s_lines.append(self.fmt(s2, k=k, m=m, calc2=_calc(f"{x}+{p}", self.x)))
                self.ops += ["*", "+"]
            else:
                self.x = x - p
                self.s_lines.append(self.fmt(s2, k=k, m=m, calc2=_calc(f"{x}-{p}", self.x)))
                self.ops += ["*", "-"]
        elif ev == "loss_fraction":
            ds = [d for d in FRACTIONS if d <= c.factor_max and x % d == 0 and self.ok(x // d) and self.ok(x - x // d)]
            d = rng.choice(ds)
            p = x // d
            q, s1, s2 = self.pick(sc.loss_fractions)
            self.q_parts.append(self.fmt(q, frac=FRACTIONS[d]))
            self.s_lines.append(self.fmt(s1, calc1=_calc(f"{x}/{d}", p)))
            self.x = x - p
            self.s_lines.append(self.fmt(s2, calc2=_calc(f"{x}-{p}", self.x)))
            self.ops += ["/", "-"]
        elif ev == "terminal":
            options = [t for t in sc.terminals if self._terminal_ok(t[0])]
            op, q, s = rng.choice(options)
            if op == "div":
                b = rng.choice(self._divisors())
                self._step1(q, s, f"{x}/{b}", x // b, "/", b=b)
            elif op == "mul":
                b = _randint(rng, 2, min(c.factor_max, c.value_max // x))
                self._step1(q, s, f"{x}*{b}", x * b, "*", b=b)
            else:  # rsub: a total T larger than x, ask what is left
                r = _randint(rng, c.operand_min, min(c.operand_max * 2, c.value_max - x))
                t = x + r
                self._step1(q, s, f"{t}-{x}", r, "-", T=t)
        else:
            raise ValueError(ev)
        self.events.append(ev)

    def _step1(self, q: str, s: str, expr: str, value: int, op: str, **nums: Any) -> None:
        if not self.ok(value):
            raise _Infeasible(f"value {value} out of range")
        self.q_parts.append(self.fmt(q, **nums))
        self.s_lines.append(self.fmt(s, calc=_calc(expr, value), **nums))
        self.x = value
        self.ops.append(op)


_EVENT_COST = {"gain": 1, "loss": 1, "gain_product": 2, "loss_product": 2, "loss_fraction": 2, "terminal": 1}


def _capitalize_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _one_problem(cfg: ArithConfig, rng: random.Random) -> dict[str, Any]:
    scen_w = dict(cfg.scenario_weights) if cfg.scenario_weights else {k: 1.0 for k in SCENARIOS}
    scen_names = [k for k in SCENARIOS if scen_w.get(k, 0.0) > 0]
    if not scen_names:
        raise ValueError("scenario_weights gives every scenario weight 0")
    ev_w = {k: 1.0 for k in EVENT_TYPES} | dict(cfg.event_weights)
    st_w = {k: 1.0 for k in START_TYPES} | dict(cfg.start_weights)
    for _ in range(200):
        scen = SCENARIOS[_weighted(rng, scen_names, scen_w)]
        n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
        she = rng.random() < 0.5
        name = rng.choice(NAMES_SHE if she else NAMES_HE)
        friend = rng.choice([n for n in NAMES_HE + NAMES_SHE if n != name])
        items, item = rng.choice(scen.items)
        boxes, box = rng.choice(scen.containers)
        words = {
            "name": name,
            "friend": friend,
            "items": items,
            "item": item,
            "boxes": boxes,
            "box": box,
            "he": "she" if she else "he",
            "He": "She" if she else "He",
            "his": "her" if she else "his",
            "His": "Her" if she else "His",
            "him": "her" if she else "him",
        }
        story = _Story(cfg, rng, scen, words)
        try:
            starts = [k for k in START_TYPES if st_w.get(k, 0) > 0]
            story.start(_weighted(rng, starts, st_w))
            remaining = n_steps - len(story.ops)
            if remaining < 0:
                continue
            while remaining > 0:
                cands = [
                    e
                    for e in EVENT_TYPES
                    if _EVENT_COST[e] <= remaining
                    and ev_w.get(e, 0) > 0
                    and (e != "terminal" or remaining == 1)
                    and story.feasible(e)
                ]
                if not cands:
                    raise _Infeasible("no feasible event")
                story.event(_weighted(rng, cands, ev_w))
                remaining = n_steps - len(story.ops)
        except _Infeasible:
            continue
        if story.events[-1] != "terminal":
            story.q_parts.append(story.fmt(scen.final))
        question = " ".join(_capitalize_first(p) for p in story.q_parts)
        solution = "\n".join(_capitalize_first(line) for line in story.s_lines) + f"\n#### {story.x}"
        return {
            "question": question,
            "solution": solution,
            "answer": str(story.x),
            "scenario": scen.key,
            "events": list(story.events),
            "ops": "".join(story.ops),
            "steps": len(story.ops),
        }
    raise RuntimeError(f"could not generate a feasible problem with {cfg}; loosen the bounds")


def generate_problems(
    cfg: ArithConfig = DEFAULT_CONFIG,
    n: int = 100,
    seed: int | str | None = None,
    *,
    split: str = "gen",
    exclude_questions: Iterable[str] = (),
    max_tries_factor: int = 50,
) -> list[Problem]:
    """``n`` distinct problems (by question text), deterministic in ``(cfg, seed, split)``.

    ``seed`` defaults to ``cfg.seed``. Questions in ``exclude_questions`` are never
    produced (used to keep splits disjoint). Ids are ``arith-{split}-{i:05d}``.
    """
    seed = cfg.seed if seed is None else seed
    rng = random.Random(f"alphallm-arith|{seed}|{split}")
    excluded = set(exclude_questions)
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries_factor * max(n, 10):
            raise RuntimeError(
                f"only {len(out)} distinct problems after {tries} tries; the config {cfg} is too narrow for n={n}"
            )
        row = _one_problem(cfg, rng)
        q = row["question"]
        if q in seen or q in excluded:
            continue
        seen.add(q)
        out.append(
            Problem(
                id=f"arith-{split}-{len(out):05d}",
                question=q,
                answer=row["answer"],
                solution=row["solution"],
                task="arith",
                meta={
                    "split": split,
                    "scenario": row["scenario"],
                    "events": row["events"],
                    "ops": row["ops"],
                    "steps": row["steps"],
                    "source": "generated",
                },
            )
        )
    return out


SPLIT_NAMES = ("train", "dev", "test", "test_hard")


def make_splits(
    seed: int = 0,
    n_train: int = 4000,
    n_dev: int = 200,
    n_test: int = 300,
    n_test_hard: int = 300,
    *,
    config: ArithConfig = DEFAULT_CONFIG,
    hard_config: ArithConfig = HARD_CONFIG,
) -> dict[str, list[Problem]]:
    """Fixed-seed ``train``/``dev``/``test`` (``config``) and ``test_hard`` (``hard_config``).

    The splits are disjoint by question text: evaluation splits are generated first
    (test, test_hard, dev) and each later split excludes the questions of the earlier
    ones, so the train split never contains an evaluation question.
    """
    out: dict[str, list[Problem]] = {}
    taken: set[str] = set()
    for split, cfg, n in (
        ("test", config, n_test),
        ("test_hard", hard_config, n_test_hard),
        ("dev", config, n_dev),
        ("train", config, n_train),
    ):
        probs = generate_problems(cfg, n, seed, split=split, exclude_questions=taken)
        taken.update(p.question for p in probs)
        out[split] = probs
    return {k: out[k] for k in SPLIT_NAMES}


def to_gsm8k_row(p: Problem) -> dict[str, str]:
    """The GSM8K file format: ``question`` and ``answer`` (solution with ``#### N``)."""
    assert p.solution is not None
    return {"question": p.question, "answer": p.solution}


def write_splits(
    directory: PathLike,
    splits: Mapping[str, list[Problem]] | None = None,
    **make_splits_kwargs: Any,
) -> dict[str, str]:
    """Write ``{split}.jsonl`` files in GSM8K format (plus ``config.json``), atomically.

    ``splits`` defaults to ``make_splits(**make_splits_kwargs)``; ``config.json`` then
    records the seed, configs and sizes used (for given ``splits`` only the counts).
    Returns split -> path. Load the files back with ``load_gsm8k(path, task="arith")``.
    Deterministic: the same arguments give byte-identical files.
    """
    d = as_path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"generator": "alphallm_jax.data.arith"}
    if splits is None:
        bound = inspect.signature(make_splits).bind(**make_splits_kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        meta["seed"] = args.pop("seed")
        meta["config"] = args.pop("config").to_dict()
        meta["hard_config"] = args.pop("hard_config").to_dict()
        meta["sizes"] = args
        splits = make_splits(**make_splits_kwargs)
    elif make_splits_kwargs:
        raise TypeError("pass either splits or make_splits arguments, not both")
    paths = {}
    for name, probs in splits.items():
        path = d / f"{name}.jsonl"
        write_jsonl_atomic(path, (to_gsm8k_row(p) for p in probs))
        paths[name] = str(path)
    meta["counts"] = {k: len(v) for k, v in splits.items()}
    atomic_write_json(d / "config.json", meta, sort_keys=True)
    return paths


_ANNOTATED = re.compile(r"(\d+)([-+*/])(\d+)=<<\1\2\3=(\d+)>>\4")


def _slipped_chain(problem: Problem, slip_of: Callable[[int, int, str, int], int | None]) -> str | None:
    """``problem``'s worked solution recomputed with ``slip_of``'s wrong results, or None.

    ``slip_of(line, a, op, b)`` gives the result a slipped line writes for ``a op b`` (the operands
    as the slipped chain shows them), or None to compute it right. Every later line works on the
    values the solution has actually written (its own arithmetic right unless it slips too), down to
    a wrong ``#### N``. None when nothing slipped, or when the wrong chain would be ambiguous (a
    computed value equal to a number of the question), leave the integers or go below 1.
    """
    if not problem.solution:
        return None
    question_numbers = set(re.findall(r"\d+", problem.question))
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: Fraction(a, b)}
    shown_of: dict[int, int] = {}  # a value of the right chain -> the value the slipped chain writes
    lines = problem.solution.split("\n")
    out, slipped = [], False
    for i, line in enumerate(lines[:-1]):
        m = _ANNOTATED.search(line)
        if m is None:
            return None
        a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if any(v in shown_of and shown_of[v] != v and str(v) in question_numbers for v in (a, b)):
            return None
        a2, b2 = shown_of.get(a, a), shown_of.get(b, b)
        if op == "-" and a2 <= b2:
            return None  # the slipped story would take away more than there is
        wrong = slip_of(i, a2, op, b2)
        r2 = ops[op](a2, b2) if wrong is None else wrong
        if r2 != int(r2) or r2 < 1:
            return None
        r2, slipped = int(r2), slipped or wrong is not None
        shown_of[r] = r2
        out.append(line[:m.start()] + f"{a2}{op}{b2}=<<{a2}{op}{b2}={r2}>>{r2}" + line[m.end():])
    final = re.fullmatch(r"#### (\d+)", lines[-1])
    if not slipped or final is None or int(final.group(1)) not in shown_of:
        return None
    return "\n".join(out + [f"#### {shown_of[int(final.group(1))]}"])


def summed_product_solution(problem: Problem) -> str | None:
    """``problem``'s worked solution with its opening product's result replaced by the sum, or None.

    The systematic slip "3 packs of 12 pencils: 3*12=<<3*12=15>>15 pencils" in the opening line
    of a ``start_product`` story, carried consistently through the later lines (each later
    expression recomputed from the wrong running value, its arithmetic right) to a wrong
    ``#### N``. The calculator check flags the opening annotation; nothing else in the text
    looks wrong. None when the story does not open with a product (or see ``_slipped_chain``).
    """
    if (problem.meta.get("events") or [""])[0] != "start_product":
        return None
    first = _ANNOTATED.search((problem.solution or "").split("\n")[0])
    if first is None or first.group(2) != "*":
        return None
    return _slipped_chain(problem, lambda i, a, op, b: a + b if i == 0 else None)


def _dropped_carry(line: int, a: int, op: str, b: int) -> int | None:
    if op == "+" and a % 10 + b % 10 >= 10:
        return a + b - 10  # 27+15=32: the units' carry never reaches the tens
    if op == "-" and a % 10 < b % 10:
        return a - b + 10  # 52-17=45: the smaller units digit taken from the larger, no borrow
    return None


def dropped_carry_solution(problem: Problem) -> str | None:
    """``problem``'s worked solution as a pupil who never carries or borrows writes it, or None.

    The classic column-arithmetic slips, applied to every addition whose units carry
    (``27+15=<<27+15=32>>32``) and every subtraction whose units borrow (``52-17=<<52-17=45>>45``),
    the written values carried into the later lines, down to a wrong ``#### N``. The slips touch
    any story whose numbers happen to carry, whatever its shape, and the calculator check flags
    each of them. None when no line carries or borrows (or see ``_slipped_chain``).
    """
    return _slipped_chain(problem, _dropped_carry)


def summed_difference_solution(problem: Problem) -> str | None:
    """``problem``'s worked solution with every subtraction's result written as the sum, or None.

    ``18-5=<<18-5=23>>23``: the sign read wrong, every time, the written values carried into the
    later lines (their own arithmetic right) down to a wrong ``#### N``. The calculator check
    flags each slipped line. None when the story subtracts nothing (or see ``_slipped_chain``).
    """
    return _slipped_chain(problem, lambda i, a, op, b: a + b if op == "-" else None)


def intermediate_answer_solution(problem: Problem) -> str | None:
    """``problem``'s worked solution, every line right, with ``#### N`` giving the result of the line
    before the last: the classic error of answering an intermediate quantity. No arithmetic is wrong,
    so the calculator check passes it; the answer line contradicts the line above it. None for a
    one-line solution, or when the two results are equal."""
    lines = (problem.solution or "").split("\n")
    if len(lines) < 3 or re.fullmatch(r"#### \d+", lines[-1]) is None:
        return None
    before_last = _ANNOTATED.search(lines[-3])
    if before_last is None or lines[-1] == f"#### {before_last.group(4)}":
        return None
    return "\n".join(lines[:-1] + [f"#### {before_last.group(4)}"])


SLIPS: dict[str, Callable[[Problem], str | None]] = {
    "summed_product": summed_product_solution,
    "dropped_carry": dropped_carry_solution,
    "summed_difference": summed_difference_solution,
    "intermediate_answer": intermediate_answer_solution,
}


def with_slips(problems: Iterable[Problem], kind: str, fraction: float, seed: int) -> list[Problem]:
    """``problems`` with a ``fraction`` of their solutions rewritten by the systematic slip ``kind``.

    A labelled set whose worked solutions carry one systematic slip (``SLIPS``) while its final
    answers (``Problem.answer``) stay right. Which problems are rewritten is deterministic in
    (``kind``, ``seed``, problem id); ``meta["slip"]`` marks them. A policy trained on it makes the
    slip whenever it is the majority habit, yet still samples the right line: the room that
    critic-guided search (the calculator check sees every one of them) and the self-training rounds are
    built to use.
    """
    if kind not in SLIPS:
        raise ValueError(f"unknown slip {kind!r}; known: {', '.join(SLIPS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"slip fraction must lie in [0, 1], got {fraction}")
    rewrite = SLIPS[kind]
    tag = "product" if kind == "summed_product" else kind  # keeps summed_product's draws as they were
    out = []
    for p in problems:
        wrong = None
        if fraction > 0 and random.Random(f"{tag}-slip|{seed}|{p.id}").random() < fraction:
            wrong = rewrite(p)
        out.append(p if wrong is None else dataclasses.replace(p, solution=wrong, meta={**p.meta, "slip": kind}))
    return out


def vocabulary(problems: Iterable[Problem]) -> set[str]:
    """The set of alphabetic words used by the questions and solutions of ``problems``."""
    words: set[str] = set()
    for p in problems:
        for text in (p.question, p.solution or ""):
            words.update(w for w in re.findall(r"[A-Za-z]+", _strip_calc(text)))
    return words


def _strip_calc(text: str) -> str:
    return re.sub(r"<<[^>]*>>", " ", text)


def check_annotations(solution: str) -> list[str]:
    """Problems with the ``<<a op b=c>>`` annotations of ``solution`` (empty: all right).

    Checks each annotation's arithmetic exactly (integers/fractions, no ``eval``), that
    the result is written right after the annotation, and that the last line is
    ``#### N`` with N the last computed value.
    """
    errors: list[str] = []
    last = None
    for m in re.finditer(r"<<([^<>=]+)=([^<>]+)>>(\S*)", solution):
        expr, result, after = m.group(1), m.group(2), m.group(3)
        parts = re.fullmatch(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*", expr)
        if not parts:
            errors.append(f"unsupported expression {expr!r}")
            continue
        a, op, b = Fraction(parts.group(1)), parts.group(2), Fraction(parts.group(3))
        if op == "/" and b == 0:
            errors.append(f"division by zero in {expr!r}")
            continue
        val = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        if val != Fraction(result):
            errors.append(f"{expr}={result} is wrong (should be {val})")
        if not after.startswith(result):
            errors.append(f"result {result} not written after <<{expr}={result}>>")
        prefix = solution[: m.start()]
        if not prefix.endswith(f"{expr}="):
            errors.append(f"annotation <<{expr}={result}>> not preceded by '{expr}='")
        last = result
    lines = solution.strip().split("\n")
    final = re.fullmatch(r"#### (-?\d+)", lines[-1].strip())
    if not final:
        errors.append("last line is not '#### N'")
    elif last is not None and final.group(1) != last:
        errors.append(f"final answer {final.group(1)} != last computed value {last}")
    return errors
