"""Sharded, resumable Parquet stores: the layout every fusekit store shares.

A store is a folder:

    DIR/manifest.json                    format, settings, fusekit version (written once)
    DIR/part-00000-of-00004.parquet      one shard: a deterministic slice of the work
    DIR/part-00000-of-00004.parquet.json its sidecar: rows, tokens, sha256, … (written after the shard)

This module owns the names (which texts shard I of N holds, what its file is called), the manifest,
the sidecars and the resume rule: a shard is complete when its Parquet file and its sidecar both exist
and the file's sha256 equals the sidecar's. Each shard is written under a temporary name, fsynced and
renamed, then its sidecar is written the same way (`atomic.py`), so a job killed at any moment leaves
either a complete shard or nothing under the final names. Sidecars (rather than one manifest that
every job rewrites) let N independent jobs on a shared filesystem fill one store without racing;
`lock.py` keeps two of them from computing the same shard."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from fusekit.store.atomic import TMP_MARK, write_json_atomic
from fusekit.store.errors import StoreError

MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
MAX_SHARDS = 99_999  # shard names carry 5 digits
_MISSING_SHOWN = 10  # missing shards named one by one; the rest are counted in one line


def parse_shard(spec: str) -> tuple[int, int]:
    """"I/N" → (I, N), I counted from 0."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m:
        raise StoreError(f"--shard must look like I/N (e.g. 0/4: the first of 4 shards), got {spec!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise StoreError(f"--shard {spec}: the number of shards must be at least 1")
    if index >= count:
        raise StoreError(f"--shard {spec}: shards are numbered 0..{count - 1} (I is 0-based)")
    return index, count


def shard_slice(n_items: int, index: int, count: int) -> range:
    """The contiguous slice of 0..n_items that shard `index` of `count` owns (sizes differ by ≤ 1)."""
    if count < 1 or not 0 <= index < count:
        raise StoreError(f"shard {index}/{count} does not exist")
    base, extra = divmod(n_items, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def shard_filename(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.parquet"


def parse_shard_filename(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_count(folder: str | Path, settings: dict) -> int:
    """The store's `num_shards`, checked: an int in 1..MAX_SHARDS, else StoreError naming manifest.json."""
    value = settings.get("num_shards")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise StoreError(
            f"{Path(folder) / MANIFEST}: num_shards {value!r} is not a shard count (1–{MAX_SHARDS:,}); "
            "the manifest is damaged or was edited: restore it or write the store again"
        )
    return value


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _fusekit_version() -> str:
    from fusekit._version import __version__

    return __version__


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{folder} is not a fusekit store (no {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); the store is damaged") from None


def open_store(folder: str | Path, format: str, settings: dict, extra: dict | None = None) -> dict:
    """The store's manifest, created on first use; refuses a folder made with other settings.

    `extra`: further manifest entries written when the store is created (not compared on re-open).
    """
    folder = Path(folder)
    settings = json.loads(json.dumps(settings, sort_keys=True))  # what a reader will see (tuples → lists)
    path = folder / MANIFEST
    if path.is_file():
        manifest = read_manifest(folder)
        if manifest.get("format") != format:
            raise StoreError(f"{folder} holds a {manifest.get('format')!r} store, not {format!r}; use another --out")
        old = manifest.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            detail = "; ".join(f"{k}: store has {old.get(k)!r}, this run {settings.get(k)!r}" for k in differ[:6])
            raise StoreError(
                f"{folder} was written with other settings ({detail}). Re-run with the store's settings, "
                "or write to another --out"
            )
        return manifest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {folder}: {exc.strerror or exc}") from None
    manifest = {**(extra or {}), "format": format, "settings": settings, "fusekit_version": _fusekit_version()}
    write_json_atomic(manifest, path)
    return manifest


def update_manifest(folder: str | Path, entries: dict) -> dict:
    """Set informational manifest entries (never format or settings); returns the new manifest."""
    reserved = {"format", "settings"} & set(entries)
    if reserved:
        raise StoreError(f"update_manifest cannot change {', '.join(sorted(reserved))}")
    manifest = read_manifest(folder)
    updated = {**manifest, **json.loads(json.dumps(entries, sort_keys=True))}
    if updated != manifest:
        write_json_atomic(updated, Path(folder) / MANIFEST)
    return updated


def record_shard(folder: str | Path, filename: str, info: dict) -> None:
    """Write the sidecar DIR/<filename>.json that marks `filename` complete (after the shard itself)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    record = dict(info)
    record["file"] = filename
    record["settings_sha256"] = settings_digest(manifest.get("settings", {}))
    if "sha256" not in record:
        record["sha256"] = sha256_file(folder / filename)
    write_json_atomic(record, folder / f"{filename}.json")


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def complete_shards(folder: str | Path) -> dict[str, dict]:
    """Shard filename → sidecar, for every shard of *this* store whose file exists (hashes not checked)."""
    folder = Path(folder)
    digest = settings_digest(read_manifest(folder).get("settings", {}))
    out: dict[str, dict] = {}
    for side in sorted(folder.glob("*.parquet.json")):
        info = _read_sidecar(side)
        name = side.name[: -len(".json")]
        if info is None or info.get("settings_sha256") != digest or not (folder / name).is_file():
            continue
        out[name] = info
    return out


def foreign_sidecars(folder: str | Path) -> list[str]:
    """Sidecars in `folder` whose shard exists but whose settings digest is not manifest.json's.

    Non-empty while no sidecar matches means manifest.json was edited (or copied from another run).
    """
    folder = Path(folder)
    digest = settings_digest(read_manifest(folder).get("settings", {}))
    out = []
    for side in sorted(folder.glob("*.parquet.json")):
        info = _read_sidecar(side)
        if info is not None and info.get("settings_sha256") != digest and (folder / side.name[: -len(".json")]).is_file():
            out.append(side.name)
    return out


def edited_manifest_error(folder: str | Path, sidecars: list[str]) -> StoreError:
    return StoreError(
        f"{Path(folder) / MANIFEST} does not match its shards: the settings of {sidecars[0]}"
        f"{f' and {len(sidecars) - 1} other sidecar(s)' if len(sidecars) > 1 else ''} differ (manifest.json was "
        "edited or comes from another run); restore the original manifest.json, or write the store again"
    )


def shard_is_complete(folder: str | Path, filename: str) -> bool:
    """The resume rule: the file and its sidecar exist, the sidecar belongs to this store, the hash matches."""
    folder = Path(folder)
    info = complete_shards(folder).get(filename)
    return info is not None and sha256_file(folder / filename) == info.get("sha256")


def verify_store(folder: str | Path) -> list[str]:
    """Everything wrong with a store, one sentence per problem naming the file; [] when it is sound."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except StoreError as exc:
        return [str(exc)]
    settings = manifest.get("settings", {})
    digest = settings_digest(settings)
    n_shards = settings.get("num_shards")
    if n_shards is not None:
        try:
            n_shards = shard_count(folder, settings)
        except StoreError as exc:
            return [f"{MANIFEST}: {str(exc).split(': ', 1)[1]}"]
    problems: list[str] = []
    known = {MANIFEST, *(manifest.get("extra_files") or [])}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in known or TMP_MARK in name:
            continue  # temporaries belong to a running or killed job; the resume rule ignores them
        if name.endswith(".parquet.json"):
            if not (folder / name[: -len(".json")]).is_file():
                problems.append(f"{name}: sidecar of a missing shard {name[: -len('.json')]}")
            continue
        if not name.endswith(".parquet"):
            problems.append(f"{name}: foreign file (not part of a fusekit store)")
            continue
        parsed = parse_shard_filename(name)
        if parsed is None:
            problems.append(f"{name}: foreign Parquet file (not named part-IIIII-of-NNNNN.parquet)")
            continue
        if n_shards is not None and parsed[1] != n_shards:
            problems.append(f"{name}: shard of a {parsed[1]}-shard run, but this store has {n_shards} shards")
            continue
        info = _read_sidecar(folder / f"{name}.json")
        if info is None:
            problems.append(f"{name}: no valid sidecar {name}.json (an interrupted or foreign shard; re-run to redo it)")
        elif info.get("settings_sha256") != digest:
            problems.append(f"{name}: shard from another run (its sidecar's settings differ from manifest.json)")
        elif sha256_file(path) != info.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (the file is corrupt or was changed; delete it and re-run)")
    if n_shards is not None:
        missing = [i for i in range(n_shards) if not (folder / shard_filename(i, n_shards)).is_file()]
        for i in missing[:_MISSING_SHOWN]:
            problems.append(f"{shard_filename(i, n_shards)}: missing shard (not written yet: re-run, or run --shard {i}/{n_shards})")
        if len(missing) > _MISSING_SHOWN:
            problems.append(f"{len(missing) - _MISSING_SHOWN:,} more: missing shards (not written yet: re-run to finish the store)")
    return problems


# ---------------------------------------------------------------------------------------------- verification stamps
#
# Hashing every shard at every start costs minutes on a large store, in every rank. Instead a shard's
# hash is checked once and the check is remembered in file times: a shard is *stamped* when its
# modification time is not later than its sidecar's. The writer leaves every shard stamped (the shard
# is published first, its sidecar — holding the sha256 of the bytes just written — after it); a later
# edit of the shard makes it newer than its sidecar, so it loses its stamp and is hashed again before
# use. A successful hash re-stamps the shard by moving the sidecar's time up to the shard's (contents
# untouched, so stores stay byte-identical); `fusekit inspect` does the same after verifying.
# Not caught: an edit that also sets the shard's time back, or bits that rot on the disk without
# any write — `fusekit inspect` hashes every shard for that.


def shard_is_stamped(folder: str | Path, filename: str) -> bool:
    """True when shard `filename` has not been modified since its sidecar was written or re-stamped."""
    folder = Path(folder)
    try:
        return os.stat(folder / filename).st_mtime_ns <= os.stat(folder / f"{filename}.json").st_mtime_ns
    except OSError:
        return False


def stamp_shard(folder: str | Path, filename: str) -> bool:
    """Record that shard `filename` was just hashed and found intact (its sidecar's time moves up to the
    shard's, or to now when later). False when the folder cannot be written (the shard is then hashed
    again at the next start)."""
    folder = Path(folder)
    side = folder / f"{filename}.json"
    try:
        when = max(os.stat(folder / filename).st_mtime_ns, time.time_ns())
        os.utime(side, ns=(when, when))
    except OSError:
        return False
    return True
