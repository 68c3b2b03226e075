"""Tokenizer on the real Mistral sentencepiece model, saved and reloaded in both formats."""

from __future__ import annotations

import json

import pytest
import transformers

from alphallm_jax.models import Tokenizer
from tests.helpers import MISTRAL_TOKENIZER, require_shared_data

TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?\n"
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
  require_shared_data()
  return Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)


def test_sentencepiece_roundtrip(tokenizer):
  ids = tokenizer.encode(TEXT)
  assert tokenizer.decode(ids) == TEXT
  assert tokenizer.encode(TEXT, add_bos=True) == [1] + ids
  assert tokenizer.decode([1] + ids + [2]) == TEXT  # BOS/EOS are not text
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_ids) == (32000, 1, (2,))
  assert tokenizer.pad_id == 0 and tokenizer.id_to_piece(1) == "<s>"
  assert tokenizer.is_sentencepiece
  with pytest.raises(ValueError, match="chat template"):
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_saved_tokenizer_loads_here_and_in_transformers(tokenizer, tmp_path):
  tokenizer.save(tmp_path)
  again = Tokenizer.from_dir(tmp_path)
  assert again.is_sentencepiece and again.encode(TEXT) == tokenizer.encode(TEXT)
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
  assert hf.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)


def test_hf_json_tokenizer(tokenizer, tmp_path):
  tokenizer.save(tmp_path / "sp")
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "sp", local_files_only=True)
  hf.chat_template = TEMPLATE
  hf.save_pretrained(tmp_path / "json")
  (tmp_path / "json" / "tokenizer.model").unlink(missing_ok=True)
  (tmp_path / "json" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
  tok = Tokenizer.from_dir(tmp_path / "json")
  assert not tok.is_sentencepiece
  assert tok.encode(TEXT) == tokenizer.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT
  assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (32000, 1, (2, 7))
  prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
  assert prompt == "[user] 2+2?\n"
  tok.save(tmp_path / "json2")
  assert Tokenizer.from_dir(tmp_path / "json2").encode(TEXT) == tokenizer.encode(TEXT)


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    Tokenizer.from_dir(tmp_path)


def test_pad_id_of_an_hf_tokenizer_without_pad_or_eos_is_zero():
  # Padding is masked everywhere, so any id serves; an HF tokenizer naming neither a pad nor an eos
  # token used to fail with an IndexError here.
  class Bare:
    pad_token_id = eos_token_id = bos_token_id = None

  assert Tokenizer(hf=Bare()).pad_id == 0


BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
                "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("where", ["config", "jinja", "json"])
def test_a_chat_template_that_writes_bos_gives_one_bos_token(tokenizer, tmp_path, where):
  """Chat prompts are encoded with add_bos=True; the template's own `{{ bos_token }}` text is left out
  of the prompt, or the prompt would start with two BOS (HF) or with `<s>` spelled as three pieces
  (sentencepiece). The template is found in tokenizer_config.json or in chat_template.jinja."""
  tokenizer.save(tmp_path)
  if where == "json":
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    hf.chat_template = BOS_TEMPLATE
    hf.save_pretrained(tmp_path / "json")
    (tmp_path / "json" / "tokenizer.model").unlink(missing_ok=True)
    directory = tmp_path / "json"
  else:
    directory = tmp_path
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if where == "config":
      config["chat_template"] = BOS_TEMPLATE
    else:
      (tmp_path / "chat_template.jinja").write_text(BOS_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  tok = Tokenizer.from_dir(directory)
  assert tok.is_sentencepiece == (where != "json")
  prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
  assert prompt == "[INST] 2+2? [/INST]"
  ids = tok.encode(prompt, add_bos=True)
  assert ids[0] == 1 and ids.count(1) == 1 and ids[1:] == tokenizer.encode("[INST] 2+2? [/INST]")


@pytest.mark.parametrize("prompt,response", [
    ("Question: How many clips?\nAnswer:\n", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"),
    ("Answer:", " Natalia  sold 24."),  # a response that starts with (two) spaces keeps them
    ("Question: x?\n", "\n\nAnswer: 7"),
])
def test_a_continuation_tokenizes_as_it_does_in_context(tokenizer, tmp_path, prompt, response):
  # SentencePiece starts text encoded on its own with a word-start marker ("▁Natalia"), which the same text
  # after the prompt does not get: the response of a training example and `Sampler.extend` text must not.
  tokenizer.save(tmp_path / "sp")
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "sp", local_files_only=True)
  hf.save_pretrained(tmp_path / "json")
  (tmp_path / "json" / "tokenizer.model").unlink(missing_ok=True)
  for tok in (tokenizer, Tokenizer.from_dir(tmp_path / "json")):
    in_context = tok.encode(prompt + response)
    assert tok.encode(prompt) + tok.encode_continuation(response) == in_context
    assert tok.encode_continuation("") == []
  if prompt.endswith("\n") and not response.startswith("\n"):
    assert tokenizer.encode(prompt) + tokenizer.encode(response) != tokenizer.encode(prompt + response)


def test_a_checkpoints_own_tokenizer_files_are_what_it_saves(tokenizer, tmp_path):
  # transformers rebuilding a tokenizer from tokenizer.model alone splits some text otherwise than the
  # checkpoint's tokenizer.json: an exported checkpoint carries the files it was read from.
  tokenizer.save(tmp_path / "sp")
  source = tmp_path / "checkpoint"
  transformers.AutoTokenizer.from_pretrained(tmp_path / "sp", local_files_only=True).save_pretrained(source)
  (source / "tokenizer.model").write_bytes((tmp_path / "sp" / "tokenizer.model").read_bytes())
  loaded = Tokenizer.from_dir(source)
  assert loaded.is_sentencepiece  # read through tokenizer.model, saved as the directory's own files
  loaded.save(tmp_path / "export")
  for f in sorted(p.name for p in source.iterdir()):
    assert (tmp_path / "export" / f).read_bytes() == (source / f).read_bytes(), f
  loaded.save(source)  # saving into its own directory leaves the files as they are
  assert (source / "tokenizer_config.json").read_bytes() == (tmp_path / "export" / "tokenizer_config.json").read_bytes()


def test_decode_keeps_the_spaces_the_tokens_spell():
  # transformers 4.x "cleans up" spaces before punctuation when a tokenizer_config asks (Llama-3's does),
  # which would make a completion's text differ from the bytes the stop rules read.
  class CleaningTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True):
      text = " ".join(["It", "'s", "done", "."][i] for i in ids)
      return text.replace(" 's", "'s").replace(" .", ".") if clean_up_tokenization_spaces else text

  assert Tokenizer(hf=CleaningTokenizer()).decode([0, 1, 2, 3]) == "It 's done ."
