"""Train a SentencePiece tokenizer in-project (the built-in demo's tokenizer, trained on arith text).

Digits are split one per token (numbers are composed digit by digit, as in Llama/Mistral), the text
is not normalised (newlines and spaces survive, so steps stay one per line), `\n` and the calculator
and answer markers are single pieces, and unknown characters fall back to bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm

from alphallm_jax.utils.io import PathLike, atomic_write_bytes

# unk, bos, eos, pad: the ids the demo model's config records.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
MARKERS = ("\n", "<<", ">>", "####")


def train_sentencepiece(texts: Iterable[str], out_path: PathLike, *, vocab_size: int = 768,
                        model_type: str = "bpe", seed_sentences: int = 1_000_000) -> spm.SentencePieceProcessor:
    """Train on `texts` (each a whole document, newlines included) and write `out_path` atomically."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        split_digits=True, character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=list(MARKERS), max_sentence_length=16384,
        input_sentence_size=seed_sentences, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        **SPECIAL_IDS)
    atomic_write_bytes(out_path, model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    sample = texts[0]
    if processor.decode(processor.encode(sample)) != sample:
        raise RuntimeError("the trained tokenizer does not round-trip its own training text")
    return processor
