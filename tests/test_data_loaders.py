"""GSM8K/MATH loaders: formats, errors that name file/line/field, limits, named splits."""

import json
import logging
from pathlib import Path

import pytest

from alphallm_jax.data.loaders import (
    DATA_DIR_ENV,
    available_splits,
    is_named_split,
    load_dataset,
    load_gsm8k,
    load_math,
    resolve_data_dir,
)
from alphallm_jax.data.problems import Problem
from alphallm_jax.utils.io import DataFormatError

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"shared data dir {DATA_DIR} is absent (expected ../shared/data beside the repo)"
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GSM_ROW = {"question": "Tom has 3 boxes of 4 pens. How many pens?", "answer": "3*4=<<3*4=12>>12\n#### 1,200"}


def test_gsm8k_basic_fields(tmp_path):
    p = _write(tmp_path / "train.jsonl", [GSM_ROW, GSM_ROW | {"question": "Q2?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    probs = load_gsm8k(p)
    assert [x.id for x in probs] == ["gsm8k-train-00000", "gsm8k-train-00001"]
    assert probs[0].answer == "1200"  # commas removed
    assert probs[0].solution == GSM_ROW["answer"]
    assert probs[0].task == "gsm8k" and probs[0].meta["line"] == 1
    assert load_gsm8k(p, limit=1) == probs[:1]
    assert load_gsm8k(p, limit=0) == []
    assert load_gsm8k(p, split="dev", task="arith")[1].id == "arith-dev-00001"


def test_gsm8k_malformed_line_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [GSM_ROW, GSM_ROW, '{"question": "x", "answer": '])
    with pytest.raises(DataFormatError) as ei:
        load_gsm8k(p)
    assert ei.value.line == 3 and str(p) in str(ei.value)
    # the limit stops reading before the bad line
    assert len(load_gsm8k(p, limit=2)) == 2


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"question": "q"}, "'answer'"),
        ({"answer": "#### 1"}, "'question'"),
        ({"question": "q", "answer": 5}, "'answer' must be a string"),
        ({"question": "q", "answer": "no final line"}, "####"),
        ({"question": "q", "answer": "#### many"}, "not a number"),
        ([1, 2], "JSON object"),
    ],
)
def test_gsm8k_field_errors(tmp_path, row, needle):
    p = _write(tmp_path / "f.jsonl", [GSM_ROW, row])
    with pytest.raises(DataFormatError) as ei:
        load_gsm8k(p)
    msg = str(ei.value)
    assert needle in msg and f"{p}:2:" in msg


def test_math_formats_and_drops(tmp_path, caplog):
    rows = [
        {"problem": "P0", "solution": "so $\\boxed{\\frac{1}{2}}$.", "level": "Level 3", "type": "Algebra"},
        {"problem": "P1", "solution": "text", "answer": "7", "level": 2, "subject": "Geometry"},
        {"problem": "P2", "answer": "", "level": "Level ?"},
        {"problem": "P3", "solution": "no box here"},
        {"problem": "P4", "answer": "\\pi"},
    ]
    p = _write(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        probs = load_math(p)
    assert [x.id for x in probs] == ["math-m-00000", "math-m-00001", "math-m-00004"]
    assert probs[0].answer == "\\frac{1}{2}" and probs[0].meta["level"] == 3
    assert probs[0].meta["subject"] == "Algebra" and probs[1].meta["subject"] == "Geometry"
    assert probs[2].solution is None and probs[2].answer == "\\pi"
    assert "dropped 1 of 5 rows: empty 'answer' field (lines 3)" in caplog.text
    assert "no \\boxed{} in 'solution' (lines 4)" in caplog.text
    with pytest.raises(DataFormatError, match=r"m.jsonl:3: unusable row"):
        load_math(p, on_unusable="error")
    kept = load_math(p, on_unusable="keep")
    assert len(kept) == 5 and kept[2].answer == "" and kept[2].meta["level"] is None
    assert [x.id for x in load_math(p, limit=2)] == ["math-m-00000", "math-m-00001"]


def test_math_missing_fields(tmp_path):
    p = _write(tmp_path / "m.jsonl", [{"problem": "P0", "answer": "1"}, {"problem": "P1"}])
    with pytest.raises(DataFormatError, match=r"m.jsonl:2: missing field 'solution' or 'answer'"):
        load_math(p)
    q = _write(tmp_path / "q.jsonl", [{"question": "P0", "answer": "1"}])
    with pytest.raises(DataFormatError, match=r"q.jsonl:1: missing field 'problem'"):
        load_math(q)


def test_load_dataset_from_path_detects_format(tmp_path):
    g = _write(tmp_path / "g.jsonl", [GSM_ROW])
    m = _write(tmp_path / "m.jsonl", [{"problem": "P", "answer": "1"}])
    assert load_dataset(str(g))[0].task == "gsm8k"
    assert load_dataset(str(g), task="arith")[0].task == "arith"
    assert load_dataset(str(m))[0].task == "math"
    assert load_dataset(str(m), task="math")[0].task == "math"
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("gsm8k:nope", data_dir=tmp_path)
    # A file whose rows another task's grader reads is named, with what to do.
    with pytest.raises(DataFormatError, match=r"g\.jsonl:1: task math reads MATH-format rows"):
        load_dataset(str(g), task="math")
    with pytest.raises(DataFormatError, match=r"m\.jsonl:1: task gsm8k reads GSM8K-format rows"):
        load_dataset(str(m), task="gsm8k")


def test_a_line_that_is_not_utf8_is_named_and_a_bom_is_read(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(GSM_ROW).encode() + b"\n" + b'{"question": "Caf\xe9 sells 3 cakes?", "answer": "#### 3"}\n')
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_gsm8k(bad)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GSM_ROW).encode() + b"\n")
    assert load_gsm8k(bom)[0].answer == "1200"


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert str(resolve_data_dir()) == str(tmp_path)
    assert str(resolve_data_dir(tmp_path / ".")) == str(tmp_path / ".")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        resolve_data_dir()
    (tmp_path / "gsm8k").mkdir()
    _write(tmp_path / "gsm8k" / "test.jsonl", [GSM_ROW])
    assert load_dataset("gsm8k:test", data_dir=tmp_path)[0].id == "gsm8k-test-00000"


@needs_data
def test_named_splits_real_data():
    assert load_dataset("gsm8k", "test", data_dir=DATA_DIR, limit=5)[4].id == "gsm8k-test-00004"
    test = load_dataset("gsm8k:test", data_dir=DATA_DIR)
    assert len(test) == 1319 and test[0].answer == "18"
    m500 = load_dataset("math", data_dir=DATA_DIR)  # default MATH eval split
    assert len(m500) == 500 and m500[0].id == "math-math500-00000"
    assert load_dataset("math:test", data_dir=DATA_DIR)[0] == m500[0]
    assert all(p.meta["level"] in range(1, 6) and p.meta["subject"] for p in m500)
    train = load_dataset("math:train4500", data_dir=DATA_DIR)
    assert len(train) == 4500 and all(p.solution and p.answer for p in train)
    assert not {p.question for p in train} & {p.question for p in m500}
    full = load_dataset("math:test5000", data_dir=DATA_DIR)
    assert len(full) == 5000 and all(p.answer for p in full)
    answers_only = load_dataset("math:train_answers", data_dir=DATA_DIR)
    assert len(answers_only) == 7498  # two multiple-choice rows with empty answers are dropped
    assert all(p.solution is None for p in answers_only)


def test_arith_named_splits():
    names = available_splits()
    assert {"arith:train", "arith:dev", "arith:test", "arith:test_hard"} <= set(names)
    test = load_dataset("arith:test")
    assert len(test) == 300 and test[0].id == "arith-test-00000" and test[0].task == "arith"
    assert load_dataset("arith", "test_hard", limit=3)[2].id == "arith-test_hard-00002"
    assert load_dataset("arith:test") == test  # cached, deterministic


def test_problem_round_trip_and_hash():
    p = Problem("x-1", "q", "1", None, "gsm8k", {"split": "test"})
    assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert len({p, Problem("x-1", "q", "1", None, "gsm8k")}) == 1
    with pytest.raises(ValueError):
        Problem("x", "q", "1", None, "chess")


def test_is_named_split_tells_names_from_paths():
    assert is_named_split("math:test5000") and is_named_split("gsm8k") and is_named_split("math:test")
    assert is_named_split("arith:test_hard")
    assert not is_named_split("questions.jsonl") and not is_named_split("data/gsm8k:test")
    assert not is_named_split("math:nope")


def test_a_split_of_another_task_family_is_refused():
    # MATH answers graded by the numeric grader (or GSM8K's as LaTeX), with GSM8K's "\n\n" stop cutting
    # MATH solutions, would give a wrong accuracy with no error.
    from alphallm_jax.data.loaders import load_dataset

    with pytest.raises(ValueError, match=r"the split math:math500 is math's and the task \(config key `task`\) is 'arith'"):
        load_dataset("math:math500", task="arith")
    with pytest.raises(ValueError, match="set task='gsm8k'"):
        load_dataset("gsm8k:test", task="math")
    assert len(load_dataset("arith:test", task="arith", limit=3)) == 3
    with pytest.raises(ValueError) as unknown:  # a typo is an unknown split, not another task's
        load_dataset("math:math50", task="arith")
    assert "config key `task`" not in str(unknown.value)
