"""Shared test paths: the data beside the repository (../shared/data), read in place, never copied."""

from __future__ import annotations

import importlib.util
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
    """`configs/<name>.py`'s `get_config(variant)`, as `--config=configs/<name>.py:<variant>` loads it."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
