"""The text and the bytes each token id contributes when decoded, for matching stop strings on device."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)  # per tokenizer object: every sampler and critic scorer of a run shares it
def token_texts(tokenizer, vocab_size: int) -> tuple[str, ...]:
    """`texts[i]` is the text token i adds when decoded after other text (empty for ids past the
    tokenizer's vocabulary).

    Each id is decoded after a plain anchor token (`plain_anchor`) and the anchor's own text is cut off:
    `decode([a, i])[len(decode([a])):]`. Decoding an id alone is wrong for sentencepiece-style decoders
    (`tokenizer.model`, or a `tokenizer.json` whose decoder strips the first space): they drop the
    word-boundary space of the first piece, which every token after the first keeps. This also gives
    control tokens (`<s>`, `</s>`) the empty text they decode to, `<unk>` the text it decodes to, and a
    byte-fallback piece of an ASCII byte its character; a token holding part of a multi-byte character
    decodes to U+FFFD (`token_bytes` gives its bytes). One decode call per id: under 0.1 s for a 32k
    vocabulary, about 0.3 s for 128k (CPU)."""
    n = min(vocab_size, tokenizer.vocab_size)
    anchor = plain_anchor(tokenizer)
    prefix = tokenizer.decode([anchor])
    texts = [_text_after(tokenizer, anchor, prefix, i) for i in range(n)]
    texts += [""] * (vocab_size - n)
    return tuple(texts)


def _text_after(tokenizer, anchor: int, prefix: str, token: int) -> str:
    full = tokenizer.decode([anchor, token])
    # A decoder that rewrites across the boundary (none seen so far) falls back to the id alone.
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode([token])


@functools.lru_cache(maxsize=8)
def plain_anchor(tokenizer) -> int:
    """A token to decode other tokens after: one whose text is a single ASCII letter or digit that
    decodes alone as it does in context (no word-boundary space to drop) and repeats without merging
    (`decode([a, a]) == 2 * decode([a])`). Found within the first few dozen ids of common vocabularies
    (sentencepiece byte pieces, byte-level BPE single characters)."""
    for token in range(tokenizer.vocab_size):
        text = tokenizer.decode([token])
        if len(text) == 1 and text.isascii() and text.isalnum() and tokenizer.decode([token, token]) == 2 * text:
            return token
    raise ValueError("the tokenizer has no token that decodes to a single ASCII letter or digit")


@functools.lru_cache(maxsize=8)
def token_bytes(tokenizer, vocab_size: int) -> tuple[bytes, ...]:
    """`token_bytes[i]` is the UTF-8 the token adds when decoded after other text: its text
    (`token_texts`) encoded, except for a token that holds part of a character (a byte-fallback piece
    such as `<0xE2>`, or a byte-level BPE token), whose text is U+FFFD: its own bytes
    (`Tokenizer.token_bytes`). Stop strings are matched over these, so a character the vocabulary spells
    in byte tokens (U+220E "∎" in Mistral's, as three byte pieces) still ends a row."""
    texts = token_texts(tokenizer, vocab_size)
    raw = getattr(tokenizer, "token_bytes", lambda _: None)
    out = []
    for i, text in enumerate(texts):
        own = raw(i) if "\ufffd" in text else None
        out.append(own if own is not None else text.encode("utf-8"))
    return tuple(out)
