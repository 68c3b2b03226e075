"""What the policy is asked, per candidate.

* fewshot (MetaMath-style): an optional instruction naming the variation wanted (new numbers, new
  entities, a different asked quantity), `num_exemplars - 1` other D0 questions, the seed question last,
  then an open `Question:` for the policy to fill.
* prefix: the seed's opening sentence(s), with new numbers, after `Question:`; the policy writes the rest
  (new events and a new asked quantity). The opening keeps a small model's question about one subject.
  Each new number is drawn within half to twice the old one, among the numbers D0's questions state
  (`renumber_draw="d0"`): uniform draws there put numbers the policy never learned to compute with into
  half of the openings, and those prompts almost never yield a trace.
* unconditional: only the question prefix, which a model trained on "Question: ...\\nAnswer:\\n..." text
  continues into a new question of its own.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import re
from collections.abc import Callable, Mapping, Sequence

from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import ANSWER_PREFIX, QUESTION_PREFIX, format_solution
from alphallm_jax.synthesis.form import INTEGER
from alphallm_jax.synthesis.settings import SynthesisSettings

BLOCK_SEPARATOR = "\n\n"
SEEDED_METHODS = ("fewshot", "prefix")  # the methods that vary a D0 seed question
_SENTENCE = re.compile(r".+?[.!?](?=\s|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class CandidateRequest:
    method: str  # fewshot | prefix | unconditional
    prompt: str
    seed_ids: tuple[str, ...] = ()  # the D0 question varied
    exemplar_ids: tuple[str, ...] = ()  # the other D0 questions shown
    variation: str = ""
    question_prefix: str = ""  # the start of the question that the prompt already holds (prefix method)


def _block(problem: Problem, with_solution: bool) -> str:
    text = f"{QUESTION_PREFIX}{problem.question.strip()}"
    if with_solution and problem.solution:
        text += "\n" + ANSWER_PREFIX + format_solution(problem.solution, problem.task, problem.answer)
    return text


def fewshot_prompt(seed: Problem, exemplars: Sequence[Problem], settings: SynthesisSettings,
                   variation: str = "") -> str:
    blocks = [_block(p, settings.exemplar_solutions) for p in (*exemplars, seed)]
    head = [settings.instruction.replace("{variation}", variation)] if settings.instruction else []
    return BLOCK_SEPARATOR.join(head + blocks) + BLOCK_SEPARATOR + QUESTION_PREFIX.rstrip()


def fewshot_request(seed: Problem, exemplars: Sequence[Problem], settings: SynthesisSettings,
                    variation: str = "") -> CandidateRequest:
    return CandidateRequest("fewshot", fewshot_prompt(seed, exemplars, settings, variation), (seed.id,),
                            tuple(p.id for p in exemplars), variation if settings.instruction else "")


def stated_numbers(problems: Sequence[Problem]) -> list[int]:
    """Every integer the questions state, with repeats, sorted: the pool `renumber` draws from."""
    return sorted(int(m.group()) for p in problems for m in INTEGER.finditer(p.question))


def renumber(text: str, rng: random.Random, pool: Sequence[int] = ()) -> str:
    """Every integer v drawn anew between half and twice its value (at least 2 and 3): from `pool`'s
    numbers in that range, each as often as the pool holds it, so the magnitudes stay those of the task;
    uniformly from the range when `pool` is empty or holds none of it."""
    def draw(match: re.Match) -> str:
        value = int(match.group())
        low, high = max(2, value // 2), max(3, 2 * value)
        start, stop = bisect.bisect_left(pool, low), bisect.bisect_right(pool, high)
        if stop > start:
            return str(pool[rng.randrange(start, stop)])
        return str(rng.randint(low, high))

    return INTEGER.sub(draw, text)


def opening(question: str, sentences: int) -> str:
    """The first `sentences` sentences of a question (never the asking one: at most all but the last)."""
    parts = _SENTENCE.findall(question.strip())
    keep = max(0, min(sentences, len(parts) - 1))
    return " ".join(p.strip() for p in parts[:keep])


def prefix_request(seed: Problem, settings: SynthesisSettings, rng: random.Random,
                   d0_numbers: Sequence[int] = ()) -> CandidateRequest:
    """`d0_numbers`: sorted, with repeats (`stated_numbers`), for `renumber_draw="d0"`."""
    start = opening(seed.question, settings.prefix_sentences)
    if settings.renumber_prefix:
        start = renumber(start, rng, d0_numbers if settings.renumber_draw == "d0" else ())
    return CandidateRequest("prefix", QUESTION_PREFIX + start, (seed.id,), (),
                            "new numbers" if settings.renumber_prefix else "", start)


def plan_round(seeds: Sequence[Problem], counts: Mapping[str, int], settings: SynthesisSettings,
               *, round_index: int, seed_offset: int,
               fits: Callable[[str], bool] = lambda prompt: True) -> list[CandidateRequest]:
    """The round's requests, `counts[method]` of each in METHODS order. Seeded methods take seeds in one
    fixed shuffled order of D0, continuing at `seed_offset` (seeds used by earlier rounds), so rounds cover
    D0 evenly. Deterministic in the settings' seed.

    `fits(prompt)`: whether a prompt leaves room for the question in the sampler; few-shot exemplars are
    dropped (the earliest first) until it does.
    """
    if any(counts.get(m) for m in SEEDED_METHODS) and not seeds:
        raise ValueError("seeded synthesis (fewshot, prefix) needs seed questions (D0 is empty)")
    order = list(range(len(seeds)))
    random.Random(f"alphallm-synthesis-seeds|{settings.seed}").shuffle(order)
    rng = random.Random(f"alphallm-synthesis-round|{settings.seed}|{round_index}")
    d0_numbers = stated_numbers(seeds) if counts.get("prefix") else []
    requests: list[CandidateRequest] = []
    used = 0
    for _ in range(counts.get("fewshot", 0)):
        seed_idx = order[(seed_offset + used) % len(order)]
        used += 1
        others = [i for i in rng.sample(range(len(seeds)), min(len(seeds), settings.num_exemplars)) if i != seed_idx]
        exemplars = [seeds[i] for i in others[:settings.num_exemplars - 1]]
        variation = rng.choice(settings.variations) if settings.variations else ""
        request = fewshot_request(seeds[seed_idx], exemplars, settings, variation)
        while not fits(request.prompt) and exemplars:
            exemplars = exemplars[1:]
            request = fewshot_request(seeds[seed_idx], exemplars, settings, variation)
        if not fits(request.prompt):
            raise ValueError(f"seed question {seeds[seed_idx].id} alone leaves no room for a new question in "
                             "the sampler: raise sampling.max_len or lower synthesis.max_new_tokens")
        requests.append(request)
    for _ in range(counts.get("prefix", 0)):
        seed_idx = order[(seed_offset + used) % len(order)]
        used += 1
        requests.append(prefix_request(seeds[seed_idx], settings, rng, d0_numbers))
    requests += [CandidateRequest("unconditional", settings.unconditional_prefix)] * counts.get("unconditional", 0)
    return requests


def question_text(completion: str, stop_string: str | None, question_prefix: str = "") -> str:
    """The question a completion wrote (after the part the prompt held): without the stop string that
    ended it, and stripped."""
    if stop_string and completion.endswith(stop_string):
        completion = completion[: -len(stop_string)]
    if question_prefix:
        completion = question_prefix + (completion if completion[:1].isspace() else " " + completion)
    return completion.strip()


def split_counts(n: int, settings: SynthesisSettings) -> dict[str, int]:
    """`n` candidates in equal shares over the configured methods (the first ones take the remainder)."""
    methods = settings.methods
    base, extra = divmod(n, len(methods))
    return {m: base + (i < extra) for i, m in enumerate(methods)}
