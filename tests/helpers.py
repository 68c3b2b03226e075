"""Shared test helpers: the data beside the repository (../shared/data), read in place, never copied; what
the loop tests compare between runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MISTRAL_TOKENIZER = SHARED_DATA / "tokenizers" / "mistral_tokenizer.model.v1"


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


def load_config(name: str, variant: str | None = None):
    """`configs/<name>.py`'s config, as `--config=configs/<name>.py:<variant>` loads it."""
    from alphallm_jax.config import load_config_file

    return load_config_file(str(REPO_ROOT / "configs" / f"{name}.py") + (f":{variant}" if variant else ""))


def loop_artifact_hashes(root: Path, suffixes=(".safetensors",)) -> dict[str, str]:
    """sha256 of a loop workdir's artifacts that must match between runs: policies (files with
    `suffixes`), trees, traces, pairs, synthesized prompts, predictions."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and (path.suffix in suffixes or path.name in (
                "sft_traces.jsonl", "pairs.jsonl", "prompts.jsonl", "predictions.jsonl")
                or (path.suffix == ".jsonl" and "/trees/" in f"/{rel}")):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def loop_accuracies(report: dict):
    """(base accuracy per method, [(SFT greedy, CPL greedy) per iteration]) of a loop report."""
    base = {k: v["accuracy"] for k, v in report["base"].items()}
    iters = [(it["sft"]["greedy"]["accuracy"], it["cpl"]["greedy"]["accuracy"]) for it in report["iterations"]]
    return base, iters


def subprocess_env() -> dict[str, str]:
    """The environment of an `alphallm` subprocess (or `launch/local.sh`) started by a test: this
    session's compilation cache, none of the caller's JAX/XLA/ALPHALLM settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALPHALLM_", "JAX_", "XLA_")) or k == "ALPHALLM_COMPILATION_CACHE"}
    env["PYTHON"] = sys.executable
    env["ALPHALLM_CMD"] = f"{sys.executable} -m alphallm_jax.cli"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def json_schema(value):
    """A JSON value with every scalar replaced by a placeholder: its keys and list lengths only."""
    if isinstance(value, dict):
        return {k: json_schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_schema(v) for v in value]
    return "value"
