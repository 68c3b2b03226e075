"""Clear errors for broken checkpoints and mismatched tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from alphallm_jax.models import (
  CheckpointError,
  Tokenizer,
  create_model,
  get_preset,
  load_hf_checkpoint,
  load_pretrained,
  save_hf_checkpoint,
)
from tests.helpers import MISTRAL_TOKENIZER, require_shared_data

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  save_hf_checkpoint(create_model(CFG), CFG, path)
  return path


def copy_with(src, dst, *, drop=None, replace=None, config=None):
  dst.mkdir()
  tensors = load_file(src / "model.safetensors")
  if drop:
    del tensors[drop]
  tensors.update(replace or {})
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  cfg = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
  return dst


def test_directory_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"config.json.*{tmp_path}"):
    load_hf_checkpoint(tmp_path)


def test_directory_without_weights(hf_dir, tmp_path):
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_hf_checkpoint(tmp_path)


def test_unknown_architecture(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path / "x", config={"architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM"):
    load_hf_checkpoint(path)


def test_missing_tensor_is_named(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path / "x", drop="model.layers.1.mlp.up_proj.weight")
  with pytest.raises(CheckpointError, match=r"Missing tensor 'model\.layers\.1\.mlp\.up_proj"):
    load_hf_checkpoint(path)


def test_misshaped_tensor_is_named(hf_dir, tmp_path):
  bad = {"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)}
  path = copy_with(hf_dir, tmp_path / "x", replace=bad)
  with pytest.raises(CheckpointError,
                     match=r"k_proj\.weight.*shape \(48, 64\), expected \(32, 64\)"):
    load_hf_checkpoint(path)


def test_config_disagreeing_with_weights(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path / "x", config={"intermediate_size": 100})
  with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*expected \(100, 64\)"):
    load_hf_checkpoint(path)


def test_tokenizer_larger_than_vocabulary(hf_dir, tmp_path):
  require_shared_data()
  tokenizer = Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)  # 32000 pieces > 256
  with pytest.raises(ValueError, match=r"Tokenizer vocabulary \(32000\).*\(256\)"):
    save_hf_checkpoint(create_model(CFG), CFG, tmp_path / "out", tokenizer=tokenizer)
  path = copy_with(hf_dir, tmp_path / "x")
  tokenizer.save(path)
  with pytest.raises(ValueError, match=r"Tokenizer vocabulary \(32000\).*\(256\)"):
    load_pretrained(path)


def test_tokenizer_with_another_bos_is_refused(tmp_path):
  """A Llama-2/Mistral tokenizer (BOS 1) fits a Llama-3-sized embedding but names another BOS."""
  require_shared_data()
  tokenizer = Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)
  cfg = CFG.replace(vocab_size=32064, bos_token_id=7)
  save_hf_checkpoint(create_model(cfg), cfg, tmp_path / "m")
  tokenizer.save(tmp_path / "m")
  with pytest.raises(ValueError, match=r"BOS id 1 differs from the model's bos_token_id 7 in .*/m"):
    load_pretrained(tmp_path / "m")
  cfg = cfg.replace(bos_token_id=1)
  save_hf_checkpoint(create_model(cfg), cfg, tmp_path / "ok", tokenizer=tokenizer)
  assert load_pretrained(tmp_path / "ok")[1].bos_id == 1


def test_tokenizer_covering_little_of_the_embedding_is_refused(tmp_path):
  """A 32k sentencepiece tokenizer beside a 40k embedding, BOS ids alike: every id means other text."""
  require_shared_data()
  tokenizer = Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)
  cfg = CFG.replace(vocab_size=40000, bos_token_id=1)
  save_hf_checkpoint(create_model(cfg), cfg, tmp_path / "m")
  tokenizer.save(tmp_path / "m")
  with pytest.raises(ValueError, match=r"Tokenizer vocabulary \(32000\) covers under 90% of the model's "
                                       r"embedding \(40000\) in .*/m"):
    load_pretrained(tmp_path / "m")
