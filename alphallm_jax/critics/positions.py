"""Where each critic head is read in a token sequence (shared by training data and scoring).

* value and PRM-of-the-newest-step: the last token of the sequence, trailing EOS/padding ignored
  (a state ends with its newest step's newline, the root state with the prompt's last token);
* ORM: the last token that is not blank (whitespace-only pieces such as a trailing newline, EOS,
  padding), so `... #### 9`, `... #### 9\\n` and `... #### 9</s>` are read at the same place;
* PRM of every step: the token holding the last character of each step separator, plus the last
  token when the text does not end with a separator.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def blank_token_ids(texts: Sequence[str], extra: Collection[int] = ()) -> frozenset[int]:
    """Ids whose surface text is whitespace only (`texts` from `sampling.token_texts`), plus `extra`."""
    return frozenset(i for i, t in enumerate(texts) if t and not t.strip()) | frozenset(int(i) for i in extra)


def strip_trailing(ids: Sequence[int], drop: Collection[int]) -> list[int]:
    """`ids` without its trailing run of tokens in `drop` (e.g. EOS)."""
    end = len(ids)
    while end > 0 and int(ids[end - 1]) in drop:
        end -= 1
    return [int(t) for t in ids[:end]]


def orm_index(ids: Sequence[int], blank_ids: Collection[int]) -> int:
    """Index of the last non-blank token (the last token when every token is blank)."""
    for i in range(len(ids) - 1, -1, -1):
        if int(ids[i]) not in blank_ids:
            return i
    return len(ids) - 1


def step_end_indices(ids: Sequence[int], texts: Sequence[str], separator: str, *, start: int = 0) -> list[int]:
    """Indices (into `ids`) of the tokens that end each step of `ids[start:]`.

    A step ends at the token holding the last character of each occurrence of `separator`; a final
    step without a trailing separator ends at the last token. Works on token texts, so it finds a
    separator split over tokens or merged into a longer piece.
    """
    if not separator:
        raise ValueError("empty step separator")
    tail = [int(t) for t in ids[start:]]
    if not tail:
        return []
    pieces = [texts[t] if t < len(texts) else "" for t in tail]
    ends_at = np.cumsum([len(p) for p in pieces])  # ends_at[j]: characters through token j
    text = "".join(pieces)
    out: list[int] = []
    pos = text.find(separator)
    while pos >= 0:
        last_char = pos + len(separator) - 1
        j = int(np.searchsorted(ends_at, last_char, side="right"))
        if not out or out[-1] != start + j:
            out.append(start + j)
        pos = text.find(separator, pos + len(separator))
    if text.strip() and (not out or out[-1] != start + len(tail) - 1):
        # Text after the last separator (or none at all): the final step ends at the last token,
        # unless all that follows is blank.
        tail_text = text[(ends_at[out[-1] - start] if out else 0):]
        if tail_text.strip():
            out.append(start + len(tail) - 1)
    return out
