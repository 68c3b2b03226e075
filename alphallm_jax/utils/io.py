"""Atomic, resumable artifact I/O used across the project.

Every artifact (reports, configs, JSONL trees, trajectories, pairs) is written either

* atomically: the whole file is written to a temporary file in the *same directory*,
  flushed, fsync'ed and then ``os.replace``'d over the destination, so a reader sees the
  old file or the new file, never a partial one (:func:`atomic_write_text`,
  :func:`atomic_write_json`, :func:`write_jsonl_atomic`); or
* append-only, one JSON object per line, each line flushed and fsync'ed
  (:func:`append_jsonl`), for per-problem outputs that a killed run resumes from. A
  ``kill -9`` during an append can leave a torn last line; :func:`read_jsonl_tolerant_tail`
  drops (and reports) exactly that line and nothing else, and can repair the file so
  later appends start on a fresh line.

Paths go through :class:`etils.epath.Path`, so ``gs://`` (and other fsspec/tf.io
schemes) work where the backend is installed. Object stores have atomic whole-object
writes and no append: there, atomic writes are plain writes and appends rewrite the
object (correct, but O(file size) per call; batch rows when writing to a bucket).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from etils import epath

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class DataFormatError(ValueError):
    """A data or artifact file is malformed.

    ``path`` and ``line`` (1-based, or ``None`` when not line-specific) say where; the
    message always starts with ``"<path>:<line>: "`` (or ``"<path>: "``).
    """

    def __init__(self, path: PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an :class:`etils.epath.Path` (local or ``gs://...``)."""
    return epath.Path(path)


def is_local(path: PathLike) -> bool:
    """True for a local filesystem path, False for a URI such as ``gs://bucket/x``."""
    return "://" not in os.fspath(path)


# Config keys naming checkpoints and run directories: orbax, safetensors and SentencePiece read and write
# these through local filesystem paths, so a bucket is mounted (gcsfuse) rather than named by URL.
FILESYSTEM_PATH_KEYS = ("model.checkpoint", "critics.checkpoint", "critics.model.checkpoint",
                        "rollout_policy.checkpoint", "search.critics", "sweep.loop_workdir", "sweep.checkpoints")


def url_paths(workdir: str | None, cfg=None) -> list[str]:
    """`what=value` for the workdir and each `FILESYSTEM_PATH_KEYS` entry of `cfg` given as a URL
    (`gs://bucket/x`): a run would write checkpoints under a local directory named `gs:` instead."""
    found = [f"--workdir={workdir}"] if workdir and not is_local(workdir) else []
    for key in FILESYSTEM_PATH_KEYS if cfg is not None else ():
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        value = node.get(leaf) if node is not None and hasattr(node, "get") else None
        values = [value] if isinstance(value, str) else list(value or ())
        for v in (v for v in values if isinstance(v, str)):
            name, sep, path = v.partition("=")
            named = key == "sweep.checkpoints" and sep and "://" not in name  # "NAME=DIR"
            if not is_local(path if named else v):
                found.append(f"{key}={v}")
    return found


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Write ``data`` to ``path`` atomically (tmp file in the same dir, fsync, rename).

    Parent directories are created. Returns the destination as an ``epath.Path``.
    """
    p = as_path(path)
    if not is_local(str(p)):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)  # object stores replace whole objects atomically
        return p
    local = os.fspath(p)
    directory = os.path.dirname(os.path.abspath(local)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(local)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return p


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> epath.Path:
    """Write ``text`` to ``path`` atomically. See :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kwargs)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> epath.Path:
    """Serialize ``obj`` as JSON (NaN/Inf rejected) and write it atomically."""
    return atomic_write_text(path, _dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def _jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(_dumps(row) + "\n" for row in rows)


def write_jsonl_atomic(path: PathLike, rows: Iterable[Any]) -> epath.Path:
    """Write ``rows`` (JSON-serialisable objects) one per line, atomically."""
    return atomic_write_text(path, _jsonl_text(rows))


def _parse_line(path: PathLike, line_no: int, line: str) -> Any:
    try:
        return json.loads(line.rstrip("\r\n"))  # a truncated row's column is its end, not line 2's column 1
    except json.JSONDecodeError as e:
        raise DataFormatError(path, line_no, f"malformed JSON ({e.msg} at column {e.colno})") from None


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line (1-based numbers).

    Blank lines are not rows and are passed over. A malformed line raises
    :class:`DataFormatError` naming the file and line.
    """
    p = as_path(path)
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(p, line_no, raw)
            if not line.strip():
                continue
            yield line_no, _parse_line(p, line_no, line)


def _decode_line(path: PathLike, line_no: int, raw: bytes) -> str:
    """A line as UTF-8 text (a byte-order mark on the first line is dropped); a byte that is not UTF-8
    (a Latin-1 file) names the file, line and column rather than failing deep in a read."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, line_no, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                             "re-save the file as UTF-8") from None


def read_jsonl(path: PathLike) -> list[Any]:
    """All rows of a JSONL file; :class:`DataFormatError` (file, line) on malformed JSON."""
    return [obj for _, obj in iter_jsonl(path)]


def append_jsonl(path: PathLike, rows: Any | Iterable[Any], *, many: bool = False) -> None:
    """Append one row (or, with ``many=True``, several rows) to a JSONL file, durably.

    The rows are serialised first (a serialisation error writes nothing), written in a
    single ``write`` call, flushed and fsync'ed. A crash can therefore only leave the
    last line torn; see :func:`read_jsonl_tolerant_tail`. Parent directories are created.
    """
    items = list(rows) if many else [rows]
    if not items:
        return
    text = _jsonl_text(items)
    p = as_path(path)
    if not is_local(str(p)):
        old = p.read_text() if p.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(old + text)
        return
    local = os.fspath(p)
    directory = os.path.dirname(os.path.abspath(local)) or "."
    os.makedirs(directory, exist_ok=True)
    created = not os.path.exists(local)
    with open(local, "ab") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(directory)


@dataclass(frozen=True)
class TornTail:
    """What :func:`read_jsonl_tolerant_tail` dropped from the end of a file."""

    path: str
    line: int  # 1-based line number of the torn line
    text: str  # the torn text (possibly truncated for display by the caller)
    repaired: bool  # True when the file was truncated to its last complete line


def read_jsonl_tolerant_tail(path: PathLike, *, repair: bool = False) -> tuple[list[Any], TornTail | None]:
    """Read a resumable JSONL file, tolerating a torn *last* line only.

    Returns ``(rows, torn)``. ``torn`` is ``None`` for a clean file; otherwise it
    describes the dropped last line (logged as a warning too). Torn means: the last
    line has no terminating newline and does not parse (an append cut short is a
    prefix of ``json + "\n"``). An unterminated last line that parses is complete and
    kept; with ``repair=True`` it gets its newline so later appends start on a fresh
    line. A malformed newline-terminated line was written whole, so it is corruption
    and raises :class:`DataFormatError`, wherever it is. A missing file reads as
    ``([], None)``.

    With ``repair=True`` a torn tail is cut off the file (local files: truncated in
    place; object stores: rewritten), so the next :func:`append_jsonl` is well-formed.
    """
    p = as_path(path)
    if not p.exists():
        return [], None
    data = p.read_bytes()
    if not data:
        return [], None
    lines = data.split(b"\n")
    # ``data`` ending with "\n" leaves an empty last element: no unterminated tail.
    tail = lines[-1]
    complete = lines[:-1]
    rows: list[Any] = []
    offset = 0  # byte offset just past the last newline-terminated line
    n_complete = len(complete)
    for i, raw in enumerate(complete):
        if raw.strip():
            text = raw.decode("utf-8", errors="replace")
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as e:
                # A newline-terminated line was written whole: this is corruption,
                # not a torn append.
                raise DataFormatError(p, i + 1, f"malformed JSON ({e.msg} at column {e.colno})") from None
        offset += len(raw) + 1
    if tail.strip():
        text = tail.decode("utf-8", errors="replace")
        line_no = n_complete + 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return rows, _drop_tail(p, data, offset, line_no, text, repair)
        if not isinstance(obj, (dict, list)):
            # A bare scalar such as ``12`` may be a cut-short ``123``: not trustworthy.
            return rows, _drop_tail(p, data, offset, line_no, text, repair)
        rows.append(obj)
        if repair:
            _rewrite_or_truncate(p, data + b"\n", None)
    return rows, None


def _drop_tail(p: epath.Path, data: bytes, keep: int, line_no: int, text: str, repair: bool) -> TornTail:
    shown = text if len(text) <= 200 else text[:200] + "..."
    log.warning(
        "%s:%d: dropping torn last line (%d bytes) of a resumable JSONL file%s: %r",
        p,
        line_no,
        len(text.encode("utf-8")),
        " and truncating the file" if repair else "",
        shown,
    )
    if repair:
        _rewrite_or_truncate(p, data[:keep], keep)
    return TornTail(path=str(p), line=line_no, text=text, repaired=repair)


def _rewrite_or_truncate(p: epath.Path, new_data: bytes, truncate_at: int | None) -> None:
    if is_local(str(p)):
        local = os.fspath(p)
        if truncate_at is not None:
            with open(local, "r+b") as f:
                f.truncate(truncate_at)
                f.flush()
                os.fsync(f.fileno())
        else:
            atomic_write_bytes(local, new_data)
    else:
        p.write_bytes(new_data)


def rebase_paths(obj: Any, old_root: str | None, new_root: str) -> Any:
    """`obj` (parsed JSON) with every string that is `old_root` or a path under it moved under `new_root`.

    Records name the files they wrote by path; a workdir moved (another disk, a bucket, a relative
    path taken from another directory) keeps working when each record also holds the root it was
    written under. `old_root` None (a record from before roots were stored) or equal: `obj` as it is.
    """
    if old_root is None or old_root == new_root:
        return obj
    old, new = old_root.rstrip("/"), new_root.rstrip("/")

    def move(x):
        if isinstance(x, str):
            return new + x[len(old):] if x == old or x.startswith(old + "/") else x
        if isinstance(x, list):
            return [move(v) for v in x]
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(obj)


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; :class:`DataFormatError` naming the file on malformed JSON."""
    p = as_path(path)
    text = p.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(p, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None


def to_jsonable(obj: Any) -> Any:
    """Best-effort conversion of numpy scalars/arrays, tuples and mappings for JSON."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars
        return obj.tolist()
    return obj


def files_fingerprint(directory: PathLike, *, block_bytes: int = 1 << 16, blocks: int = 16) -> str:
    """A content fingerprint (sha256 hex) of every file under `directory`, such as a checkpoint: relative
    names, sizes, files up to `blocks * block_bytes` whole and larger ones by `blocks` evenly spaced
    blocks, so a 7B checkpoint costs a few MB of reads. Retrained weights differ in every block; a copied
    or moved checkpoint keeps its fingerprint (no paths or times go in)."""
    import hashlib

    root = as_path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {root}")
    def files(folder: epath.Path, prefix: str) -> Iterator[tuple[str, epath.Path]]:
        for child in sorted(folder.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                yield from files(child, f"{prefix}{child.name}/")
            else:
                yield f"{prefix}{child.name}", child

    digest = hashlib.sha256()
    for name, path in files(root, ""):
        size = path.stat().length
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= blocks * block_bytes:
                digest.update(f.read())
                continue
            for i in range(blocks):
                f.seek(i * (size - block_bytes) // (blocks - 1))
                digest.update(f.read(block_bytes))
    return digest.hexdigest()


ABSENT = "<absent>"  # json_changes' value for a leaf one record lacks


def json_changes(old: Any, new: Any, resumable: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf where two JSON records differ ("<absent>" for a
    missing leaf), sorted, leaving out the keys in `resumable` (a key ending in "." covers its subtree).
    Both records go through JSON first, so tuples and lists compare equal."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(json.loads(json.dumps(old))), flat(json.loads(json.dumps(new)))
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, ABSENT) != b.get(k, ABSENT) and not key_in(k, resumable)]


def key_in(key: str, keys: Iterable[str]) -> bool:
    """Whether dotted `key` is one of `keys`, or under one ending in "." (a subtree)."""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in keys)
