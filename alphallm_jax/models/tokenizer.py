"""Tokenizer wrapper: sentencepiece (`tokenizer.model`) or HF tokenizers (`tokenizer.json`).

Local files only. Padding is masked by position -1 in the decoder, so `pad_id` is only a filler.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# A checkpoint's tokenizer, as `Tokenizer.save` copies it from the directory it was read from.
TOKENIZER_FILES = (SP_FILE, HF_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, "special_tokens_map.json",
                   "added_tokens.json")


def _load_hf(directory: Path):
  import transformers  # imported lazily: only HF-format tokenizers need it
  return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _generation_eos(directory: Path) -> tuple[int, ...]:
  path = directory / GENERATION_CONFIG_FILE
  if not path.is_file():
    return ()
  eos = json.loads(path.read_text()).get("eos_token_id")
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, list) else (eos,)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
  """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which Llama-3's and most
  `tokenizer.json` byte-level vocabularies use): printable Latin-1 bytes stand for themselves, the
  others for U+0100 onwards in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _has_byte_level_decoder(spec: dict | None) -> bool:
  if not spec:
    return False
  return spec.get("type") == "ByteLevel" or any(_has_byte_level_decoder(d) for d in spec.get("decoders") or ())


class Tokenizer:
  """encode/decode plus the special ids the sampler and data pipeline need."""

  def __init__(self, *, sp: spm.SentencePieceProcessor | None = None, hf: Any = None,
               extra_eos_ids: Sequence[int] = (), chat_source: Any = None):
    if (sp is None) == (hf is None):
      raise ValueError("Tokenizer needs exactly one of a sentencepiece or an HF tokenizer")
    self._sp, self._hf = sp, hf
    self._source_dir: Path | None = None  # the directory `from_dir` read, whose files `save` copies
    self._chat_source = chat_source if chat_source is not None else hf
    eos = [sp.eos_id()] if sp is not None else [hf.eos_token_id]
    self.eos_ids: tuple[int, ...] = tuple(
        dict.fromkeys(i for i in [*eos, *extra_eos_ids] if i is not None and i >= 0))

  # ---- loaders -------------------------------------------------------------------------------
  @classmethod
  def from_sentencepiece(cls, path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"No sentencepiece model at {path}")
    return cls(sp=spm.SentencePieceProcessor(model_file=str(path)))

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
    """tokenizer.model (sentencepiece) if present, else tokenizer.json (HF)."""
    directory = Path(directory)
    extra_eos = _generation_eos(directory)
    if (directory / SP_FILE).is_file():
      sp = spm.SentencePieceProcessor(model_file=str(directory / SP_FILE))
      chat_source = None
      config = directory / TOKENIZER_CONFIG_FILE
      # Recent transformers saves the template beside the config (chat_template.jinja), older ones in it.
      if (directory / CHAT_TEMPLATE_FILE).is_file() or (
          config.is_file() and json.loads(config.read_text()).get("chat_template")):
        chat_source = _load_hf(directory)
      tokenizer = cls(sp=sp, extra_eos_ids=extra_eos, chat_source=chat_source)
    elif (directory / HF_FILE).is_file():
      tokenizer = cls(hf=_load_hf(directory), extra_eos_ids=extra_eos)
    else:
      raise FileNotFoundError(f"No {SP_FILE} or {HF_FILE} in {directory}")
    tokenizer._source_dir = directory
    return tokenizer

  # ---- properties ----------------------------------------------------------------------------
  @property
  def is_sentencepiece(self) -> bool:
    return self._sp is not None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() if self._sp is not None else len(self._hf)

  @property
  def bos_id(self) -> int | None:
    bos = self._sp.bos_id() if self._sp is not None else self._hf.bos_token_id
    return None if bos is None or bos < 0 else bos

  @property
  def pad_id(self) -> int:
    if self._sp is not None:
      for candidate in (self._sp.pad_id(), self._sp.unk_id()):
        if candidate >= 0:
          return candidate
    elif self._hf.pad_token_id is not None:
      return self._hf.pad_token_id
    if self.eos_ids:
      return self.eos_ids[0]
    # Padding is masked everywhere (positions -1, no loss), so any id serves; 0 when none is named.
    return 0

  # ---- text <-> ids --------------------------------------------------------------------------
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    if self._sp is not None:
      ids = list(self._sp.encode(text))
    else:
      ids = list(self._hf.encode(text, add_special_tokens=False))
    if add_bos:
      if self.bos_id is None:
        raise ValueError("This tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return ids

  def encode_continuation(self, text: str) -> list[int]:
    """Ids of `text` as it tokenizes after other text. A SentencePiece tokenizer (Llama-2, Mistral)
    starts text encoded on its own with a word-start marker: `encode("He")` is `▁He`, while in
    `"Answer:\n" + "He"` the same word is `He`. So the text is encoded behind a newline, which these
    tokenizers keep in a token of its own, and the newline's ids are dropped; where a newline would
    merge into the text (byte-level BPE's `\n\n` tokens, which have no marker to drop), the text is
    encoded on its own."""
    if not text:
      return []
    lead = self.encode("\n")
    ids = self.encode("\n" + text)
    return ids[len(lead):] if ids[:len(lead)] == lead else self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens (BOS/EOS) dropped; spaces kept as the tokens spell them (not
    "cleaned up" before punctuation, which some `tokenizer_config.json` files ask for: the sampler's
    stop rules read the tokens' own bytes, and a completion's text must be what they read)."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

  def id_to_piece(self, token_id: int) -> str:
    if self._sp is not None:
      return self._sp.id_to_piece(int(token_id))
    return self._hf.convert_ids_to_tokens(int(token_id))

  def token_bytes(self, token_id: int) -> bytes | None:
    """The bytes a byte token stands for, None for other tokens: a byte-fallback piece (`<0xE2>`,
    sentencepiece or `tokenizer.json`) or a byte-level BPE token. Such tokens can hold part of a
    character, which `decode` of the token alone turns into U+FFFD."""
    piece = self.id_to_piece(token_id)
    match = _BYTE_PIECE.fullmatch(piece or "")
    if match:
      return bytes([int(match.group(1), 16)])
    if self._hf is not None and self._byte_level:
      alphabet = _byte_level_alphabet()
      if piece and all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    return None

  @functools.cached_property
  def _byte_level(self) -> bool:
    backend = getattr(self._hf, "backend_tokenizer", None)
    return backend is not None and _has_byte_level_decoder(json.loads(backend.to_str()).get("decoder"))

  def apply_chat_template(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts) using the HF chat template, without
    the BOS text a template starts with (`{{ bos_token }}`): prompts are encoded with `add_bos=True`,
    which would add a second BOS, or (sentencepiece, which reads no special tokens in text) spell
    `<s>` as three ordinary pieces."""
    source = self._chat_source
    if source is None or not getattr(source, "chat_template", None):
      raise ValueError("This tokenizer has no chat template")
    text = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    bos = getattr(source, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text

  # ---- persistence ---------------------------------------------------------------------------
  def save(self, directory: str | os.PathLike) -> None:
    """Writes files that both `Tokenizer.from_dir` and transformers' AutoTokenizer load. A tokenizer read
    from a checkpoint directory is saved as that directory's own tokenizer files, copied: transformers
    rebuilding a tokenizer from `tokenizer.model` alone need not split text as the original
    `tokenizer.json` does (leading and repeated spaces, special tokens written in text)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = self._source_dir
    if source is not None and source.resolve() == directory.resolve():
      return  # its own files are there
    if source is not None:
      copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
      if SP_FILE in copied or HF_FILE in copied:
        for name in copied:
          tmp = directory / (name + ".tmp")
          shutil.copyfile(source / name, tmp)
          os.replace(tmp, directory / name)
        return
    if self._sp is None:
      self._hf.save_pretrained(str(directory))
      return
    tmp = directory / (SP_FILE + ".tmp")
    tmp.write_bytes(self._sp.serialized_model_proto())
    os.replace(tmp, directory / SP_FILE)
    piece = lambda i: self._sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(self._sp.bos_id()),
              "eos_token": piece(self._sp.eos_id()), "unk_token": piece(self._sp.unk_id()),
              "add_bos_token": True, "add_eos_token": False}
    if self._chat_source is not None and getattr(self._chat_source, "chat_template", None):
      config["chat_template"] = self._chat_source.chat_template
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
