"""Which run a resumable folder's results belong to: `check_run_identity` records what they depend on
(the models by content, the settings, the seed) in the folder's run.json and refuses to resume past
results of another run. Used by evaluation workdirs, `alphallm search`, `alphallm train-policy` and the SFT
controls."""

from __future__ import annotations

import json
from collections.abc import Sequence

from alphallm_jax.utils.distributed import barrier, is_coordinator
from alphallm_jax.utils.io import ABSENT, as_path, atomic_write_json, json_changes, key_in, read_json

RUN_RECORD = "run.json"


def check_run_identity(folder, identity: dict, resumable: Sequence[str] = (),
                       required: Sequence[str] = ()) -> None:
    """Record `identity` (what a folder's resumable results depend on) in `folder`/run.json on the first
    call; on later calls raise a ValueError naming what differs outside `resumable`, rather than resume
    past results that another policy or setting produced. A key only one side has is no conflict (an
    evaluation that adds a critic method records the critic then), and joins the record, except the
    keys in `required` (dotted; "a." covers a subtree): their results depend on them from the start, so
    a record without one was written before it was recorded and cannot vouch for it. A folder that
    holds no results yet (a first attempt that failed early) takes the new identity."""
    folder = as_path(folder)
    path = folder / RUN_RECORD
    identity = json.loads(json.dumps(identity))
    if is_coordinator() and (not path.exists() or not _holds_results(folder)):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, identity)
    barrier(f"{folder.name}:identity")
    recorded = read_json(path)
    changed = [(k, a, b) for k, a, b in json_changes(recorded, identity, resumable)
               if ABSENT not in (a, b) or key_in(k, required)]
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        older = (" (its record predates a setting this run records, so it may hold results of other "
                 "settings)" if any(a == ABSENT for _, a, _ in changed) else "")
        raise ValueError(f"{folder} holds results of another run{older}, which differs in {shown}{more}: "
                         f"resuming would mix the two. Use a new workdir, or remove {folder}.")
    joined = _joined(recorded, identity)
    if is_coordinator() and joined != recorded:
        atomic_write_json(path, joined)


def _holds_results(folder) -> bool:
    """Whether `folder` holds a non-empty file besides the run and config records, at any depth."""
    for child in folder.iterdir():
        if child.is_dir():
            if _holds_results(child):
                return True
        elif child.name not in (RUN_RECORD, "config.json") and child.stat().length > 0:
            return True
    return False


def _joined(recorded: dict, new: dict) -> dict:
    """`recorded` with the keys only `new` has added, at every depth."""
    out = dict(recorded)
    for k, v in new.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _joined(out[k], v)
    return out
