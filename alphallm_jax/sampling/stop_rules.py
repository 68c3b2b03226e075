"""Stop strings matched on device, token by token, with a KMP automaton lifted to tokens.

For a stop string s, the automaton state q is the length of the longest suffix of the bytes generated
so far that is a prefix of s's UTF-8. Feeding a token means feeding its bytes (`token_texts.token_bytes`:
bytes, not characters, so a character the vocabulary spells in byte tokens is matched too);
`table[q, token]` is the state after the token, or the stop's length once s has appeared anywhere
inside the token or across the token boundary. The tables are built once per (tokenizer, stop strings)
on the host and make the device-side check one gather per step, so the decode loop can stop rows
without returning to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

from alphallm_jax.utils.shapes import pow2_at_least


def _failure_function(s: bytes) -> list[int]:
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _advance(s: bytes, fail: list[int], q: int, data: bytes) -> int:
    """Feed `data` to the automaton of `s` from state q; returns len(s) on a match."""
    for ch in data:
        while q and ch != s[q]:
            q = fail[q - 1]
        if ch == s[q]:
            q += 1
            if q == len(s):
                return q
    return q


def build_stop_table(stop: str, token_bytes: tuple[bytes, ...]) -> np.ndarray:
    """`int32[m + 1, vocab]` transition table, m the length of `stop` in UTF-8 bytes; row m (matched)
    is absorbing."""
    if not stop:
        raise ValueError("empty stop string")
    target = stop.encode("utf-8")
    fail = _failure_function(target)
    m, vocab = len(target), len(token_bytes)
    table = np.zeros((m + 1, vocab), dtype=np.int32)
    table[m, :] = m
    stop_bytes = set(target)
    for token, data in enumerate(token_bytes):
        if not data:  # no text (a special token decoding to nothing): every state stays where it was
            table[:m, token] = np.arange(m)
            continue
        if not stop_bytes.intersection(data):
            continue  # a token without any byte of s resets every state to 0
        for q in range(m):
            table[q, token] = _advance(target, fail, q, data)
    return table


def stop_length(stop: str) -> int:
    """The automaton's match state for `stop`: its length in UTF-8 bytes."""
    return len(stop.encode("utf-8"))


def ending_stop(text, stops: Iterable, context=None, within: Iterable = ()):
    """The stop string that ended `text`: the one whose first occurrence ends earliest (on a tie, the
    longer, which holds the shorter as its end); None when none occurs. An occurrence may begin in
    `context`, the text `text` continues, but must end in `text`; those of `within` must lie in `text`.
    Text, context and stops are all `str` or all `bytes`."""
    stops, within = list(stops), set(within)
    context = context[max(0, len(context) - max(map(len, stops), default=1) + 1):] if context else text[:0]
    joined, found = context + text, []
    for s in stops:
        at = joined.find(s, len(context) if s in within else max(0, len(context) - len(s) + 1))
        if at >= 0:
            found.append((at + len(s), -len(s), s))
    return min(found)[2] if found else None


def strip_stop(text: str, stops: Iterable[str]) -> str:
    """`text` without the stop string that ended it (it belongs to what comes next, not the answer): the
    longest stop `text` ends with (`"\n\n"` sampled as one token ends the text with `"\n"` as well)."""
    ending = [s for s in stops if s and text.endswith(s)]
    return text[: -max(map(len, ending))] if ending else text


class StopTables:
    """The stacked tables of several stop strings: `int32[K, Q, V]`.

    K and Q are padded (K to a power of two >= 4, Q to one >= 16) so that different stop sets share
    one decode compile; a padded string row stays in state 0 and its match state is never reached.
    """

    MIN_STRINGS, MIN_STATES = 4, 16

    def __init__(self, stops: tuple[str, ...], token_bytes: tuple[bytes, ...]):
        self.stops = stops
        num_strings = pow2_at_least(len(stops), self.MIN_STRINGS)
        num_states = pow2_at_least(max(map(stop_length, stops), default=0) + 1, self.MIN_STATES)
        table_kqv = np.zeros((num_strings, num_states, len(token_bytes)), dtype=np.int32)
        for k, s in enumerate(stops):
            table_kqv[k, : stop_length(s) + 1] = _cached_table(s, token_bytes)
        never = num_states  # no table entry holds it
        self.match_state_k = np.array([stop_length(s) for s in stops] + [never] * (num_strings - len(stops)),
                                      dtype=np.int32)
        self.table_kqv = table_kqv
        self._device = None

    def on_device(self):
        """(table_kqv, match_state_k) as device arrays, sent once rather than with every decode call."""
        if self._device is None:
            import jax.numpy as jnp

            self._device = (jnp.asarray(self.table_kqv), jnp.asarray(self.match_state_k))
        return self._device

    def index(self, stop: str) -> int:
        return self.stops.index(stop)

    def initial_state(self, stop: str, context: bytes) -> int:
        """The automaton state of `stop` after `context`'s last bytes (fewer than the stop's length, so
        never the match): a stop string that begins in the text a sample continues, and ends in it."""
        target = stop.encode("utf-8")
        tail = context[max(0, len(context) - len(target) + 1):] if len(target) > 1 else b""
        return _advance(target, _cached_failure(target), 0, tail) if tail else 0


@functools.lru_cache(maxsize=256)
def _cached_failure(target: bytes) -> list[int]:
    return _failure_function(target)


@functools.lru_cache(maxsize=64)
def _cached_table(stop: str, token_bytes: tuple[bytes, ...]) -> np.ndarray:
    return build_stop_table(stop, token_bytes)
