"""TFDS builders (optional extra): only run where tensorflow_datasets is installed."""

import json
import sys

import pytest


def test_project_data_path_needs_no_tensorflow():
    import alphallm_jax.data  # noqa: F401
    import alphallm_jax.data.tfds_builders  # noqa: F401  (module import is lazy too)

    assert "tensorflow" not in sys.modules or "tensorflow_datasets" in sys.modules


def test_missing_tfds_gives_clear_error(monkeypatch):
    from alphallm_jax.data import tfds_builders

    if "tensorflow_datasets" in sys.modules:
        pytest.skip("tensorflow_datasets already imported")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    monkeypatch.setattr(tfds_builders, "_CLASSES", {})
    with pytest.raises(ImportError, match=r"alphallm_jax\[tfds\]"):
        tfds_builders.get_builder_class("gsm8k")


def test_tfds_builders_from_local_files(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from alphallm_jax.data.tfds_builders import build_tfds

    raw = tmp_path / "raw"
    (raw / "gsm8k").mkdir(parents=True)
    (raw / "math").mkdir()
    g = [{"question": f"Q{i}?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(5)]
    for split in ("train", "test"):
        (raw / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g))
    m500 = [{"problem": "P0", "solution": "$\\boxed{1}$", "answer": "1", "level": 1, "subject": "Algebra"}]
    full = m500 + [{"problem": "P1", "solution": "$\\boxed{\\frac{1}{2}}$", "level": "Level 2", "type": "Algebra"}]
    (raw / "math" / "math500_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m500))
    (raw / "math" / "math_test_full5000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full))

    b = build_tfds("gsm8k", raw, tmp_path / "tfds")
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 5, "test": 5}
    ex = next(iter(b.as_dataset(split="test").take(1)))
    assert ex["answer"].numpy().decode() in {str(i + 1) for i in range(5)}

    bm = build_tfds("math", raw, tmp_path / "tfds")
    assert {k: v.num_examples for k, v in bm.info.splits.items()} == {"test": 1, "test5000": 2, "train": 1}
    ex = next(iter(bm.as_dataset(split="train")))
    assert ex["answer"].numpy().decode() == "\\frac{1}{2}" and int(ex["level"].numpy()) == 2
