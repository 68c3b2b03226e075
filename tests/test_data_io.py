"""Atomic artifact writing and resumable JSONL reading (alphallm_jax.utils.io)."""

import json
import logging
import os

import pytest

from alphallm_jax.utils.io import (
    DataFormatError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    read_jsonl_tolerant_tail,
    write_jsonl_atomic,
)


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_atomic_write_text_and_json(tmp_path):
    p = tmp_path / "sub" / "report.txt"
    atomic_write_text(p, "hello\n")
    assert p.read_text() == "hello\n"
    atomic_write_text(p, "bye\n")
    assert p.read_text() == "bye\n"
    j = tmp_path / "r.json"
    atomic_write_json(j, {"a": [1, 2], "b": "é"})
    assert read_json(j) == {"a": [1, 2], "b": "é"}
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    write_jsonl_atomic(p, [{"i": 0}, {"i": 1}])
    before = p.read_bytes()

    def rows():
        yield {"i": 0}
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(p, rows())
    with pytest.raises(ValueError):  # NaN is not valid JSON
        atomic_write_json(p, {"x": float("nan")})
    assert p.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n{"a": 4}\n')
    with pytest.raises(DataFormatError) as ei:
        read_jsonl(p)
    err = ei.value
    assert err.line == 4 and err.path == str(p)
    assert f"{p}:4:" in str(err)
    assert "at column 7" in str(err)  # the row's own end, not column 1 of the line after its newline
    assert isinstance(err, ValueError)


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_append_and_torn_tail(tmp_path, caplog):
    p = tmp_path / "out" / "per_problem.jsonl"
    append_jsonl(p, {"id": 0})
    append_jsonl(p, [{"id": 1}, {"id": 2}], many=True)
    assert read_jsonl(p) == [{"id": 0}, {"id": 1}, {"id": 2}]
    # simulate kill -9 in the middle of an append
    with open(p, "ab") as f:
        f.write(b'{"id": 3, "text": "half wri')
    with pytest.raises(DataFormatError):
        read_jsonl(p)
    with caplog.at_level(logging.WARNING):
        rows, torn = read_jsonl_tolerant_tail(p)
    assert rows == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert torn is not None and torn.line == 4 and not torn.repaired
    assert "torn last line" in caplog.text
    rows, torn = read_jsonl_tolerant_tail(p, repair=True)
    assert torn is not None and torn.repaired
    append_jsonl(p, {"id": 3})
    assert read_jsonl(p) == [{"id": i} for i in range(4)]
    assert read_jsonl_tolerant_tail(p) == ([{"id": i} for i in range(4)], None)


def test_tolerant_tail_rejects_corruption_before_last_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": 0}\n{"id": 1\n{"id": 2}\n')
    with pytest.raises(DataFormatError) as ei:
        read_jsonl_tolerant_tail(p)
    assert ei.value.line == 2


def test_tolerant_tail_complete_line_without_newline(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"id": 0}\n{"id": 1}')
    rows, torn = read_jsonl_tolerant_tail(p, repair=True)
    assert rows == [{"id": 0}, {"id": 1}] and torn is None
    append_jsonl(p, {"id": 2})
    assert read_jsonl(p) == [{"id": 0}, {"id": 1}, {"id": 2}]
    # a bare number without newline may be cut short: treated as torn
    q = tmp_path / "num.jsonl"
    q.write_text('{"id": 0}\n12')
    rows, torn = read_jsonl_tolerant_tail(q)
    assert rows == [{"id": 0}] and torn is not None


def test_missing_and_empty_files(tmp_path):
    assert read_jsonl_tolerant_tail(tmp_path / "nope.jsonl") == ([], None)
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


def test_unicode_round_trip(tmp_path):
    p = tmp_path / "u.jsonl"
    rows = [{"q": "Janet’s ducks — 16 eggs", "a": "\\frac{1}{2}"}]
    write_jsonl_atomic(p, rows)
    assert read_jsonl(p) == rows
    assert json.loads(p.read_text(encoding="utf-8").splitlines()[0]) == rows[0]


def test_files_fingerprint_follows_content_not_place(tmp_path):
    import shutil

    import numpy as np

    from alphallm_jax.utils.io import files_fingerprint

    ckpt = tmp_path / "a"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text('{"hidden_size": 8}')
    weights = np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32)  # 2 MiB: read in blocks
    (ckpt / "sub" / "model.safetensors").write_bytes(weights.tobytes())
    base = files_fingerprint(ckpt)
    shutil.copytree(ckpt, tmp_path / "b")  # a copy (new times, new place) keeps it
    assert files_fingerprint(tmp_path / "b") == base
    (tmp_path / "b" / "config.json").write_text('{"hidden_size": 9}')
    assert files_fingerprint(tmp_path / "b") != base
    (ckpt / "sub" / "model.safetensors").write_bytes((weights * 1.001).tobytes())  # retrained: every block
    assert files_fingerprint(ckpt) != base
    (ckpt / "sub" / "model.safetensors").write_bytes(weights.tobytes())
    assert files_fingerprint(ckpt) == base
    (ckpt / "sub" / "model.safetensors").rename(ckpt / "sub" / "other.safetensors")
    assert files_fingerprint(ckpt) != base
    with pytest.raises(FileNotFoundError, match="nowhere"):
        files_fingerprint(tmp_path / "nowhere")
