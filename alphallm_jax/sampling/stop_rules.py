"""Stop strings matched on device, token by token, with a KMP automaton lifted to tokens.

For a stop string s, the automaton state q is the length of the longest suffix of the text generated
so far that is a prefix of s. Feeding a token means feeding its characters; `table[q, token]` is the
state after the token, or `len(s)` once s has appeared anywhere inside the token or across the token
boundary. The tables are built once per (tokenizer, stop strings) on the host and make the device-side
check one gather per step, so the decode loop can stop rows without returning to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

from alphallm_jax.utils.shapes import pow2_at_least


def _failure_function(s: str) -> list[int]:
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _advance(s: str, fail: list[int], q: int, text: str) -> int:
    """Feed `text` to the automaton of `s` from state q; returns len(s) on a match."""
    for ch in text:
        while q and ch != s[q]:
            q = fail[q - 1]
        if ch == s[q]:
            q += 1
            if q == len(s):
                return q
    return q


def build_stop_table(stop: str, token_texts: tuple[str, ...]) -> np.ndarray:
    """`int32[len(stop) + 1, vocab]` transition table; row len(stop) (matched) is absorbing."""
    if not stop:
        raise ValueError("empty stop string")
    fail = _failure_function(stop)
    m, vocab = len(stop), len(token_texts)
    table = np.zeros((m + 1, vocab), dtype=np.int32)
    table[m, :] = m
    stop_chars = set(stop)
    for token, text in enumerate(token_texts):
        if not text:  # no text (a special token decoding to nothing): every state stays where it was
            table[:m, token] = np.arange(m)
            continue
        if not stop_chars.intersection(text):
            continue  # a token without any character of s resets every state to 0
        for q in range(m):
            table[q, token] = _advance(stop, fail, q, text)
    return table


def ending_stop(text: str, stops: Iterable[str]) -> str | None:
    """The stop string that ended `text`: the one whose first occurrence ends earliest (on a tie, the
    longer, which holds the shorter as its end); None when none occurs."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
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

    def __init__(self, stops: tuple[str, ...], token_texts: tuple[str, ...]):
        self.stops = stops
        num_strings = pow2_at_least(len(stops), self.MIN_STRINGS)
        num_states = pow2_at_least(max((len(s) for s in stops), default=0) + 1, self.MIN_STATES)
        table_kqv = np.zeros((num_strings, num_states, len(token_texts)), dtype=np.int32)
        for k, s in enumerate(stops):
            table_kqv[k, : len(s) + 1] = _cached_table(s, token_texts)
        never = num_states  # no table entry holds it
        self.match_state_k = np.array([len(s) for s in stops] + [never] * (num_strings - len(stops)),
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


@functools.lru_cache(maxsize=64)
def _cached_table(stop: str, token_texts: tuple[str, ...]) -> np.ndarray:
    return build_stop_table(stop, token_texts)
