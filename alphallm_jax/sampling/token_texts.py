"""The text each token id contributes when decoded, for matching stop strings on device."""

from __future__ import annotations

import re

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_texts(tokenizer, vocab_size: int) -> tuple[str, ...]:
    """`texts[i]` is the surface text of token i (empty for ids past the tokenizer's vocabulary).

    SentencePiece pieces map `\u2581` to a space and byte-fallback pieces `<0xNN>` to their byte (a
    non-ASCII byte becomes U+FFFD, which no ASCII stop string matches). Other tokenizers decode each
    id on its own, which is exact for the byte-level BPE vocabularies of Llama 3.
    """
    texts = []
    n = min(vocab_size, tokenizer.vocab_size)
    for i in range(n):
        piece = tokenizer.id_to_piece(i) if tokenizer.is_sentencepiece else None
        if piece is None:
            texts.append(tokenizer.decode([i]))
            continue
        byte = _BYTE_PIECE.match(piece)
        if byte:
            value = int(byte.group(1), 16)
            texts.append(chr(value) if value < 128 else "\ufffd")
        else:
            texts.append(piece.replace("\u2581", " "))
    texts += [""] * (vocab_size - n)
    return tuple(texts)
