"""Stage bookkeeping shared by every implicit-fusion stage: identity files and atomic parquet writes.

A stage folder holds `stage.json` = {"identity": …, "done": bool, …}. Re-running a stage with another
identity (other options, other prompts) is refused rather than mixing two runs in one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fusekit.implicit.errors import ImplicitError

STAGE_FILE = "stage.json"


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (first 16 hex digits)."""
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, model name, chunk index): stable across runs and machines."""
    return int(fingerprint(list(parts)), 16) & ((1 << 63) - 1)


def read_stage(folder: Path) -> dict | None:
    path = folder / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def changed_keys(now: dict, saved: dict) -> list[str]:
    return sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))


def resumable(folder: Path, identity: dict) -> bool:
    """True when `folder` holds this very stage (same identity), finished or not."""
    record = read_stage(folder)
    return record is not None and record["identity"] == identity


def open_stage(folder: Path, identity: dict, name: str, redo: bool = False, replace: bool = False, notify=None) -> dict | None:
    """Create `folder` (or check it belongs to this identity); returns the finished record, if done.

    `redo=True` (an earlier stage was just redone, so this one's inputs changed) forgets the record.
    A record with another identity is forgotten too when `replace` (the stage is cheap to redo; `notify`
    is told which keys changed); otherwise it is refused with an ImplicitError naming the keys.
    """
    folder.mkdir(parents=True, exist_ok=True)
    record = read_stage(folder)
    if record is not None and not redo and record["identity"] != identity:
        diff = changed_keys(identity, record["identity"])
        if not replace:
            raise ImplicitError(
                f"{folder} holds a {name} stage with other inputs or options ({', '.join(diff)}): "
                "use another workdir, or delete that folder to redo the stage"
            )
        if notify is not None:
            notify(f"{name}: {', '.join(diff)} changed since the last run, redoing it and the stages after it")
        record = None
    if record is None or redo:
        write_json(folder / STAGE_FILE, {"identity": identity, "done": False})
        return None
    return record if record.get("done") else None


def finish_stage(folder: Path, identity: dict, **info: Any) -> dict:
    record = {"identity": identity, "done": True, **info}
    write_json(folder / STAGE_FILE, record)
    return record


def write_json(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_parquet(frame, path: Path) -> Path:
    """Write under a temporary name, then rename: an interrupted write never looks like a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return path
