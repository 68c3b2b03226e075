"""Imagination: the policy writes new, unlabelled prompts from the seed set D0 (ALGORITHMS.md section 6).

Rounds of sampling and filtering until `num_prompts` questions are kept (or `max_rounds` ran out). Each
candidate goes through the filters in order and is counted under the first one that drops it:

  form (one reason per rule, see `form.REASONS`) -> test_overlap (any evaluation split of the task)
  -> near_duplicate_d0 -> near_duplicate_synthetic (kept earlier, this iteration or previous ones)
  -> surplus (well-formed and new, but the quota was already full)

so `generated == kept + sum(dropped)`. No labels are produced: the prompts are judged later by the
critics only.

Artifacts in `out_dir` (process 0 writes; every file atomically):
  settings.json           the settings, seeds and test splits; a resume with other settings is refused
  rounds/round_RRR.jsonl  every candidate of a round as sampled (a resumed run reads these instead of
                          sampling again, so a killed run ends with the same prompts)
  prompts.jsonl           {"id", "question", "seed_ids", "exemplar_ids", "method", "variation", "round"}
  rejected.jsonl          dropped candidates with their reason (and the matching text's key)
  counts.json             generated / kept / dropped per filter / per method
  DONE                    written last; a finished directory is loaded, not recomputed
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from alphallm_jax.data.problems import Problem
from alphallm_jax.synthesis.form import REASONS, form_problem, number_limit, vocabulary
from alphallm_jax.synthesis.near_duplicates import NearDuplicateIndex
from alphallm_jax.synthesis.prompting import (
    SEEDED_METHODS,
    CandidateRequest,
    plan_round,
    question_text,
    split_counts,
    stated_numbers,
)
from alphallm_jax.synthesis.settings import SynthesisSettings
from alphallm_jax.utils.distributed import barrier, broadcast_int, is_coordinator
from alphallm_jax.utils.io import (
    as_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    write_jsonl_atomic,
)

DONE = "DONE"
DROP_REASONS = (*REASONS, "test_overlap", "near_duplicate_d0", "near_duplicate_synthetic", "surplus")
_MAX_OVERSAMPLE = 8.0  # a later round asks for at most this many times `oversample` per missing prompt


@dataclasses.dataclass
class SynthesisResult:
    prompts: list[dict[str, Any]]
    counts: dict[str, Any]
    out_dir: str

    def problems(self, task: str) -> list[Problem]:
        """The prompts as unlabelled Problems (empty answer, no solution) for the search."""
        return [Problem(id=p["id"], question=p["question"], answer="", solution=None, task=task,
                        meta={"split": "synthetic", "method": p["method"], "seed_ids": p["seed_ids"]})
                for p in self.prompts]


class _Filters:
    """The filter chain and its counts; `keep_or_reason` is called once per candidate, in order."""

    def __init__(self, settings: SynthesisSettings, seeds: Sequence[Problem],
                 test_questions: Mapping[str, Sequence[Problem]], previous: Sequence[tuple[str, str]]):
        d = settings.dedup
        kw = dict(shingle_size=d.shingle_size, num_perm=d.num_perm, seed=settings.seed)
        self.settings = settings
        self.known_words = vocabulary(p.question for p in seeds)
        self.max_number = number_limit(stated_numbers(seeds), settings.form)
        self.test = NearDuplicateIndex(d.test_threshold, **kw)
        for split, problems in test_questions.items():
            self.test.add_many((f"{split}|{p.id}", p.question) for p in problems)
        self.d0 = NearDuplicateIndex(d.d0_threshold, **kw)
        self.d0.add_many((p.id, p.question) for p in seeds)
        self.synthetic = NearDuplicateIndex(d.synthetic_threshold, **kw)
        self.synthetic.add_many(previous)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.test_overlap_by_split = {split: 0 for split in test_questions}
        self.by_method: dict[str, dict[str, int]] = {}
        self.generated = 0
        self.kept: list[dict[str, Any]] = []

    def _reason(self, cand: dict[str, Any]) -> tuple[str | None, str | None]:
        question = cand["question"]
        reason = form_problem(question, self.settings.form, truncated=cand["finish_reason"] == "length",
                              known_words=self.known_words, max_number=self.max_number)
        if reason:
            return reason, None
        for name, index in (("test_overlap", self.test), ("near_duplicate_d0", self.d0),
                            ("near_duplicate_synthetic", self.synthetic)):
            match = index.find(question)
            if match is not None:
                return name, match[0]
        if len(self.kept) >= self.settings.num_prompts:
            return "surplus", None
        return None, None

    def add(self, cand: dict[str, Any], prompt_id: str) -> dict[str, Any] | None:
        """Counts `cand`; returns the rejected record, or None when it was kept."""
        self.generated += 1
        method = self.by_method.setdefault(cand["method"], {"generated": 0, "kept": 0})
        method["generated"] += 1
        reason, match = self._reason(cand)
        if reason is None:
            method["kept"] += 1
            self.synthetic.add(prompt_id, cand["question"])
            self.kept.append({"id": prompt_id, "question": cand["question"], "seed_ids": cand["seed_ids"],
                              "exemplar_ids": cand["exemplar_ids"], "method": cand["method"],
                              "variation": cand["variation"], "round": cand["round"]})
            return None
        self.dropped[reason] += 1
        if reason == "test_overlap":
            self.test_overlap_by_split[match.split("|", 1)[0]] += 1
        return {"round": cand["round"], "index": cand["index"], "reason": reason, "match": match,
                "method": cand["method"], "question": cand["question"]}

    def counts(self, rounds: int) -> dict[str, Any]:
        counts = {"generated": self.generated, "kept": len(self.kept), "rounds": rounds, "dropped": self.dropped,
                  "test_overlap_by_split": self.test_overlap_by_split, "by_method": self.by_method}
        assert self.generated == len(self.kept) + sum(self.dropped.values()), counts
        return counts


def _round_seed(seed: int, round_index: int) -> int:
    return zlib.crc32(f"alphallm-synthesis|{seed}|{round_index}".encode()) & 0x7FFFFFFF


def _sample_round(sampler, requests: Sequence[CandidateRequest], settings: SynthesisSettings,
                  round_index: int) -> list[dict[str, Any]]:
    """One sampler call for the seeded requests (one sample each), one for the unconditional ones (one
    shared prompt, forked into its samples); candidates in request order."""
    seeded = [r for r in requests if r.method != "unconditional"]
    unconditional = [r for r in requests if r.method == "unconditional"]
    kw = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
              top_k=settings.top_k, stop=settings.stop)
    seed = _round_seed(settings.seed, round_index)
    completions = []
    if seeded:
        completions += [c[0] for c in sampler.generate([r.prompt for r in seeded], seed=seed, **kw)]
    if unconditional:
        completions += sampler.generate([unconditional[0].prompt], num_samples=len(unconditional),
                                        seed=seed + 1, **kw)[0]
    return [{"round": round_index, "index": j, "method": r.method, "seed_ids": list(r.seed_ids),
             "exemplar_ids": list(r.exemplar_ids), "variation": r.variation, "text": c.text,
             "question": question_text(c.text, c.stop_string, r.question_prefix), "finish_reason": c.finish_reason}
            for j, (r, c) in enumerate(zip(seeded + unconditional, completions))]


def _round_size(settings: SynthesisSettings, filters: _Filters) -> int:
    """Candidates to sample next: the prompts still missing times the observed drop rate (the first
    round: times `oversample`), within [oversample, 8 * oversample] per missing prompt."""
    need = settings.num_prompts - len(filters.kept)
    factor = settings.oversample
    if filters.generated:
        rate = len(filters.kept) / filters.generated
        factor = _MAX_OVERSAMPLE * settings.oversample if rate == 0 else 1.25 / rate
        factor = min(max(factor, settings.oversample), _MAX_OVERSAMPLE * settings.oversample)
    return max(1, math.ceil(need * factor))


def _settings_record(settings: SynthesisSettings, seeds: Sequence[Problem],
                     test_questions: Mapping[str, Sequence[Problem]], num_previous: int) -> dict[str, Any]:
    seed_digest = zlib.crc32("\n".join(p.id for p in seeds).encode())
    record = {"settings": settings.to_dict(), "num_seeds": len(seeds), "seeds_crc32": seed_digest,
            "test_splits": {s: len(ps) for s, ps in test_questions.items()}, "num_previous": num_previous}
    return json.loads(json.dumps(record))  # the form it has when read back (tuples become lists)


def _check_settings(out, record: dict[str, Any]) -> None:
    path = out / "settings.json"
    if path.exists():
        saved = read_json(path)
        if saved != record:
            raise ValueError(f"{out} holds a synthesis made with other settings or seeds; use a new directory "
                             f"or remove it (saved: {saved}, now: {record})")
    elif is_coordinator():
        atomic_write_json(path, record)


def load_synthesis(out_dir) -> SynthesisResult | None:
    """A finished synthesis directory, or None when it is not finished."""
    out = as_path(out_dir)
    if not (out / DONE).exists():
        return None
    return SynthesisResult(prompts=read_jsonl(out / "prompts.jsonl"), counts=read_json(out / "counts.json"),
                           out_dir=str(out))


def synthesize(sampler, seeds: Sequence[Problem], settings: SynthesisSettings, out_dir, *,
               test_questions: Mapping[str, Sequence[Problem]], previous: Sequence[tuple[str, str]] = (),
               id_prefix: str = "syn", fits=None, progress: bool = True) -> SynthesisResult:
    """Sample and filter new prompts with `sampler` (the policy's `Sampler`); see the module docstring.

    Args:
      seeds: D0, the labelled seed questions (few-shot exemplars; near-duplicates of them are dropped).
      test_questions: split name -> problems of every evaluation split (overlaps are dropped).
      previous: (id, question) of prompts synthesized in earlier iterations (near-duplicates dropped).
      id_prefix: prompt ids are `{id_prefix}-{n:05d}` in the order kept.
      fits: `fits(prompt) -> bool`, whether a prompt leaves the sampler room for a question (default:
        tokens + max_new_tokens <= sampler.max_len).
    """
    out = as_path(out_dir)
    record = _settings_record(settings, seeds, test_questions, len(previous))
    if broadcast_int(int((out / DONE).exists())):
        _check_settings(out, record)
        return load_synthesis(out)
    _check_settings(out, record)
    if fits is None:
        def fits(prompt: str) -> bool:
            return len(sampler.tokenizer.encode(prompt, add_bos=True)) + settings.max_new_tokens <= sampler.max_len

    filters = _Filters(settings, seeds, test_questions, previous)
    rejected: list[dict[str, Any]] = []
    rounds_dir = out / "rounds"
    seeds_used = 0
    rounds = 0
    bar = tqdm(total=settings.num_prompts, desc="synthesis", unit="prompt", disable=not progress or not is_coordinator())
    for r in range(settings.max_rounds):
        if len(filters.kept) >= settings.num_prompts:
            break
        path = rounds_dir / f"round_{r:03d}.jsonl"
        # Every process takes the same branch (sampling may be a collective over a multi-host mesh).
        if broadcast_int(int(path.exists())):
            candidates = read_jsonl(path)
        else:
            requests = plan_round(seeds, split_counts(_round_size(settings, filters), settings), settings,
                                  round_index=r, seed_offset=seeds_used, fits=fits)
            candidates = _sample_round(sampler, requests, settings, r)
            if is_coordinator():
                write_jsonl_atomic(path, candidates)
            barrier(f"synthesis:{out}:round{r}")
        seeds_used += sum(c["method"] in SEEDED_METHODS for c in candidates)
        before = len(filters.kept)
        for cand in candidates:
            dropped = filters.add(cand, f"{id_prefix}-{len(filters.kept):05d}")
            if dropped is not None:
                rejected.append(dropped)
        bar.update(len(filters.kept) - before)
        rounds = r + 1
    bar.close()
    counts = filters.counts(rounds)
    if is_coordinator():
        write_jsonl_atomic(out / "prompts.jsonl", filters.kept)
        write_jsonl_atomic(out / "rejected.jsonl", rejected)
        atomic_write_json(out / "counts.json", counts)
        atomic_write_text(out / DONE, "")
    barrier(f"synthesis:{out}:done")
    return SynthesisResult(prompts=filters.kept, counts=counts, out_dir=str(out))


def summary_line(counts: Mapping[str, Any]) -> str:
    """One line for the console and the report: kept of generated, then every non-zero drop."""
    drops = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v)
    return f"synthesis: kept {counts['kept']} of {counts['generated']} in {counts['rounds']} round(s)" + (
        f"; dropped: {drops}" if drops else "")


def require_prompts(counts: Mapping[str, Any], out_dir) -> None:
    """Refuse an imagination that kept no prompt: the search after it would have nothing to search and
    the round would train on nothing while reporting success. The error names each filter's drops and
    the file of rejected samples, so the cause (a policy that writes no well-formed question, filters too
    strict, too few samples) can be read off."""
    if counts["kept"]:
        return
    raise ValueError(
        f"{summary_line(counts)}: imagination kept no prompt, so there is nothing to search. Read the "
        f"dropped samples in {as_path(out_dir) / 'rejected.jsonl'} (each with its reason); sample more "
        "(synthesis.num_prompts, synthesis.max_rounds) or loosen the filter that drops them, in a new workdir "
        "(a finished synthesis is not sampled again).")
