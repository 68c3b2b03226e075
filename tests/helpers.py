"""Shared test paths: the data beside the repository (../shared/data), read in place, never copied."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MISTRAL_TOKENIZER = SHARED_DATA / "tokenizers" / "mistral_tokenizer.model.v1"


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA
