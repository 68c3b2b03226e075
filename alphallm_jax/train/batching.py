"""Host-side batching for the trainer: SFT collation, generic dict collation, a resumable iterator.

Batches are dicts of numpy arrays with a leading batch dimension of exactly ``batch_size`` rows
(a short last batch is filled with empty rows whose ``row_mask`` is 0 and whose loss mask is 0),
so every train step has the same batch shape; sequence lengths are rounded up to a multiple of
``pad_to_multiple`` so only a few shapes are ever compiled.

SFT batches are right-padded::

    input_ids  [B, L] int32   prompt tokens then response tokens then pad_id
    loss_mask  [B, L] int32   1 where the token is a response token (a target), else 0
    positions  [B, L] int32   0..n-1 on real tokens, -1 on padding (masked out of attention)
    row_mask   [B]    int32   1 for a real example, 0 for a filler row

``loss_mask[b, t]`` marks token ``t`` as a target, predicted from the logits at ``t - 1``; prompt
tokens and padding are never targets. No packing: the decoder has no segment ids, so sequences are
kept one per row and length bucketing keeps padding low instead.

``BatchIterator`` is deterministic: the batches of epoch ``e`` are a function of (seed, e, the
examples) only, so its state is just ``(epoch, step)`` and a resumed run sees exactly the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
CollateFn = Callable[[Sequence[Any], int], Batch]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One supervised example: the loss covers ``response_ids`` only."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "response_ids", tuple(int(t) for t in self.response_ids))

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def as_sft_example(x: Any) -> SFTExample:
    """An ``SFTExample`` from itself, a ``(prompt_ids, response_ids)`` pair or a dict with those keys."""
    if isinstance(x, SFTExample):
        return x
    if isinstance(x, Mapping):
        return SFTExample(x["prompt_ids"], x["response_ids"])
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return SFTExample(x[0], x[1])
    raise TypeError(f"cannot read an SFT example from {type(x).__name__}: "
                    "want SFTExample, (prompt_ids, response_ids) or a dict with those keys")


def drop_overlong(examples: Sequence[T], max_seq_len: int | None, what: str,
                  length_fn: Callable[[T], int] = len) -> list[T]:
    """`examples` without those longer than `max_seq_len` tokens, with a warning that counts them. A
    batch keeps a sequence's first tokens only (`collate_sft`, `dpo.collate_preference`), so a longer
    trace would train without its answer and EOS, and a longer pair could score two equal cut-offs."""
    if not max_seq_len:
        return list(examples)
    kept = [e for e in examples if length_fn(e) <= max_seq_len]
    if len(kept) < len(examples):
        longest = max(length_fn(e) for e in examples)
        log.warning("dropped %d of %d %s longer than max_seq_len=%d tokens (the longest %d)",
                    len(examples) - len(kept), len(examples), what, max_seq_len, longest)
    return kept


def drop_overlong_splits(train: Sequence[T], dev: Sequence[T], max_seq_len: int | None, what: str, key: str,
                         length_fn: Callable[[T], int] = len) -> tuple[list[T], list[T]]:
    """`drop_overlong` on a train and a dev split; an error naming the config `key` when it empties a
    non-empty train split."""
    kept = drop_overlong(train, max_seq_len, f"train {what}", length_fn)
    if train and not kept:
        raise ValueError(f"all {len(train)} train {what} are longer than {key}={max_seq_len}")
    return kept, drop_overlong(dev, max_seq_len, f"dev {what}", length_fn)


def padded_length(n: int, *, max_seq_len: int | None, pad_to_multiple: int = 1,
                  fixed: bool = False) -> int:
    """The batch length for a longest row of ``n`` tokens: a multiple of ``pad_to_multiple``, at most
    ``max_seq_len`` (always ``max_seq_len`` when ``fixed``)."""
    if fixed:
        if max_seq_len is None:
            raise ValueError("fixed-length batches need max_seq_len")
        return max_seq_len
    m = max(1, pad_to_multiple)
    length = max(m, -(-n // m) * m)
    return length if max_seq_len is None else min(length, max_seq_len)


def collate_sft(examples: Sequence[Any], num_rows: int, *, max_seq_len: int | None = None,
                pad_to_multiple: int = 64, fixed_length: bool = False, pad_id: int = 0) -> Batch:
    """Right-padded SFT batch of ``num_rows`` rows (see the module doc for the keys).

    A sequence longer than ``max_seq_len`` keeps its first ``max_seq_len`` tokens.
    """
    exs = [as_sft_example(x) for x in examples]
    if len(exs) > num_rows:
        raise ValueError(f"{len(exs)} examples for a batch of {num_rows} rows")
    longest = max((len(e) for e in exs), default=1)
    length = padded_length(longest, max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple,
                           fixed=fixed_length)
    input_ids = np.full((num_rows, length), pad_id, np.int32)
    loss_mask = np.zeros((num_rows, length), np.int32)
    positions = np.full((num_rows, length), -1, np.int32)
    row_mask = np.zeros((num_rows,), np.int32)
    for i, e in enumerate(exs):
        tokens = (e.prompt_ids + e.response_ids)[:length]
        n = len(tokens)
        input_ids[i, :n] = tokens
        loss_mask[i, len(e.prompt_ids):n] = 1
        positions[i, :n] = np.arange(n)
        row_mask[i] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "positions": positions,
            "row_mask": row_mask}


def sft_length(x: Any) -> int:
    return len(as_sft_example(x))


def collate_dicts(examples: Sequence[Mapping[str, Any]], num_rows: int, *,
                  max_seq_len: int | None = None, pad_to_multiple: int = 64,
                  fixed_length: bool = False, pad_values: Mapping[str, Any] | None = None) -> Batch:
    """Stacks dict examples into a batch of ``num_rows`` rows.

    Scalars and fixed-shape arrays are stacked; 1-D arrays (token sequences) are right-padded to one
    common batch length (all 1-D keys share it, so e.g. chosen and rejected sequences line up) and
    cut at ``max_seq_len``. Padding uses ``pad_values[key]`` (default 0); filler rows are all padding.
    Adds ``row_mask``.
    """
    if not examples:
        raise ValueError("collate_dicts needs at least one example (it reads the keys from them)")
    if len(examples) > num_rows:
        raise ValueError(f"{len(examples)} examples for a batch of {num_rows} rows")
    pad_values = dict(pad_values or {})
    keys = list(examples[0].keys())
    if any(set(ex.keys()) != set(keys) for ex in examples):
        raise ValueError("all dict examples must have the same keys")
    arrays = {k: [np.asarray(ex[k]) for ex in examples] for k in keys}
    seq_keys = [k for k in keys if arrays[k][0].ndim == 1]
    longest = max((a.shape[0] for k in seq_keys for a in arrays[k]), default=1)
    length = padded_length(longest, max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple,
                           fixed=fixed_length)
    out: Batch = {}
    for k in keys:
        vals = arrays[k]
        fill = pad_values.get(k, 0)
        if k in seq_keys:
            if any(v.ndim != 1 for v in vals):
                raise ValueError(f"key {k!r}: mixed ranks across examples")
            arr = np.full((num_rows, length), fill, dtype=vals[0].dtype)
            for i, v in enumerate(vals):
                arr[i, :min(len(v), length)] = v[:length]
        else:
            shape = vals[0].shape
            if any(v.shape != shape for v in vals):
                raise ValueError(f"key {k!r}: shapes differ across examples; only 1-D keys are padded")
            arr = np.full((num_rows, *shape), fill, dtype=vals[0].dtype)
            for i, v in enumerate(vals):
                arr[i] = v
        out[k] = arr
    row_mask = np.zeros((num_rows,), np.int32)
    row_mask[:len(examples)] = 1
    out["row_mask"] = row_mask
    return out


def dict_length(x: Mapping[str, Any]) -> int:
    """The longest 1-D array of a dict example (0 when it has none)."""
    return max((np.asarray(v).shape[0] for v in x.values() if np.ndim(v) == 1), default=0)


def default_collate(example: Any, *, max_seq_len: int | None, pad_to_multiple: int,
                    fixed_length: bool = False, pad_id: int = 0) -> tuple[CollateFn, Callable[[Any], int]]:
    """(collate_fn, length_fn) for the kind of ``example``: SFT pairs or dicts of arrays."""
    if isinstance(example, Mapping) and not {"prompt_ids", "response_ids"} <= set(example):
        return (functools.partial(collate_dicts, max_seq_len=max_seq_len,
                                  pad_to_multiple=pad_to_multiple, fixed_length=fixed_length),
                dict_length)
    as_sft_example(example)  # raises a clear TypeError for anything else
    return (functools.partial(collate_sft, max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple,
                              fixed_length=fixed_length, pad_id=pad_id),
            sft_length)


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Where a ``BatchIterator`` stands: the next batch is batch ``step`` of epoch ``epoch``."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> IteratorState:
        return cls(int(d["epoch"]), int(d["step"]))


class BatchIterator:
    """Deterministic, resumable batches over a fixed list of examples.

    Per epoch: a permutation of the examples seeded by ``(seed, epoch)`` (when ``shuffle``); then,
    with a ``length_fn`` and ``bucket_window`` > 1, each window of ``bucket_window * batch_size``
    consecutive examples is sorted by length and cut into batches (similar lengths share a batch,
    so little padding), and finally the order of all the epoch's batches is shuffled with the same
    generator. Without shuffling (evaluation) the examples are only length-sorted within windows.

    ``set_epoch_order(e, order)`` replaces all of this for epoch ``e`` by a given order.

    ``next(it)`` returns the batch at ``it.state`` and advances the state, rolling over to the next
    epoch; ``it.state = IteratorState(e, s)`` jumps anywhere.
    """

    def __init__(self, examples: Sequence[Any], *, batch_size: int, collate_fn: CollateFn,
                 length_fn: Callable[[Any], int] | None = None, seed: int = 0, shuffle: bool = True,
                 bucket_window: int = 32, drop_remainder: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("BatchIterator needs at least one example")
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_window = bucket_window
        self.drop_remainder = drop_remainder
        self.lengths = (np.asarray([length_fn(x) for x in self.examples], np.int64)
                        if length_fn is not None else None)
        n = len(self.examples)
        self.steps_per_epoch = n // batch_size if drop_remainder else math.ceil(n / batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} examples give no full batch of {batch_size} with drop_remainder")
        self._state = IteratorState()
        self._plans: dict[int, list[np.ndarray]] = {}
        self._orders: dict[int, np.ndarray] = {}

    def fingerprint(self) -> dict[str, int]:
        """A summary stored in checkpoints to notice a resume on different data."""
        return {"num_examples": len(self.examples), "batch_size": self.batch_size,
                "total_length": int(self.lengths.sum()) if self.lengths is not None else -1,
                "seed": self.seed}

    def set_epoch_order(self, epoch: int, order: Sequence[int]) -> None:
        """Fixes the example order of ``epoch`` (a permutation of all example indices).

        That epoch's batches are then consecutive slices of ``order``: no shuffling and no length
        bucketing, since a curriculum (CPL) or the caller decides the order. Only the newest
        epoch's order is kept.
        """
        n = len(self.examples)
        order_n = np.asarray(order, np.int64)
        if order_n.shape != (n,) or not np.array_equal(np.sort(order_n), np.arange(n)):
            raise ValueError(f"the order of epoch {epoch} must be a permutation of the {n} example "
                             f"indices, got {order_n.shape[0] if order_n.ndim == 1 else order_n.shape}")
        self._orders = {epoch: order_n}
        self._plans.pop(epoch, None)

    def epoch_order(self, epoch: int) -> np.ndarray | None:
        """The order set by ``set_epoch_order`` for ``epoch`` (None when the epoch is shuffled)."""
        return self._orders.get(epoch)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of ``epoch``."""
        if epoch in self._plans:
            return self._plans[epoch]
        n = len(self.examples)
        if epoch in self._orders:
            order = self._orders[epoch]
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            if self.drop_remainder and len(batches[-1]) < self.batch_size:
                batches = batches[:-1]
            self._plans = {epoch: batches}
            return batches
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.lengths is not None and self.bucket_window > 1:
            window = self.bucket_window * self.batch_size
            chunks = []
            for start in range(0, n, window):
                w = order[start:start + window]
                chunks.append(w[np.argsort(-self.lengths[w], kind="stable")])
            order = np.concatenate(chunks)
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_remainder and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plans = {epoch: batches}  # keep only the current epoch's plan
        return batches

    def get_batch(self, epoch: int, step: int) -> Batch:
        plan = self.epoch_plan(epoch)
        if not 0 <= step < len(plan):
            raise IndexError(f"step {step} outside an epoch of {len(plan)} batches")
        return self.collate_fn([self.examples[i] for i in plan[step]], self.batch_size)

    @property
    def state(self) -> IteratorState:
        return self._state

    @state.setter
    def state(self, value: IteratorState) -> None:
        if not 0 <= value.step < self.steps_per_epoch or value.epoch < 0:
            raise ValueError(f"iterator state {value} outside epochs of {self.steps_per_epoch} steps")
        self._state = value

    def __iter__(self) -> BatchIterator:
        return self

    def peek(self) -> Batch:
        """The batch at the current state, without advancing."""
        return self.get_batch(self._state.epoch, self._state.step)

    def advance(self) -> None:
        """Moves the state one batch on (rolling over to the next epoch)."""
        s = self._state
        nxt = s.step + 1
        self._state = (IteratorState(s.epoch + 1, 0) if nxt == self.steps_per_epoch
                       else IteratorState(s.epoch, nxt))

    def __next__(self) -> Batch:
        batch = self.peek()
        self.advance()
        return batch

    def iterate_epoch(self, epoch: int = 0):
        """All batches of one epoch, in order (evaluation)."""
        for step in range(len(self.epoch_plan(epoch))):
            yield self.get_batch(epoch, step)


def valid_accum_steps(batch_size: int, dp: int) -> list[int]:
    """The grad_accum_steps that split `batch_size` examples into equal microbatches that divide over
    `dp` (data x fsdp) devices."""
    return [a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % dp == 0]


def microbatch_problem(batch_size: int, grad_accum_steps: int, dp: int) -> str | None:
    """Why a train step cannot split its batch over the mesh, or None: the trainer refuses such a config
    and `alphallm plan` reports it before a run gets that far."""
    micro = batch_size // grad_accum_steps
    if micro % dp == 0:
        return None
    valid = valid_accum_steps(batch_size, dp)
    fix = (f"grad_accum_steps one of {valid}" if valid else f"a batch_size that is a multiple of {dp}")
    return (f"microbatch of {micro} examples (batch_size {batch_size} / grad_accum_steps {grad_accum_steps}) "
            f"does not divide over data*fsdp = {dp} devices: use {fix}")
