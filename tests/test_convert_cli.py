"""`alphallm convert`: HF safetensors <-> orbax, keeping the source's parameter dtype by default."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphallm_jax.models import create_model
from alphallm_jax.models.hf_io import hf_param_dtype, load_hf_checkpoint, save_hf_checkpoint
from tests.helpers import REPO_ROOT
from tests.tiny_lm import arith_tokenizer, model_config


def _convert(*args):
    run = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "convert", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_convert_keeps_a_bfloat16_checkpoints_dtype_both_ways(tmp_path):
    tokenizer = arith_tokenizer(tmp_path)
    cfg = dataclasses.replace(model_config(tokenizer), param_dtype="bfloat16", dtype="bfloat16")
    model = create_model(cfg, seed=0)
    save_hf_checkpoint(model, cfg, tmp_path / "hf", tokenizer=tokenizer)
    assert hf_param_dtype(tmp_path / "hf") == "bfloat16"
    # HF -> orbax -> HF without --param_dtype: bfloat16 throughout (it used to come out float32, twice the size).
    _convert(f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'orbax'}", "--to=orbax")
    assert json.loads((tmp_path / "orbax" / "model_config.json").read_text())["param_dtype"] == "bfloat16"
    _convert(f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'back'}", "--to=hf")
    assert hf_param_dtype(tmp_path / "back") == "bfloat16"
    back, _ = load_hf_checkpoint(tmp_path / "back", param_dtype="bfloat16")
    before, after = (jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (model, back))
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # An explicit --param_dtype still wins.
    _convert(f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'wide'}", "--to=hf", "--param_dtype=float32")
    assert hf_param_dtype(tmp_path / "wide") == "float32"
