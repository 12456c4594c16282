"""Sharded, resumable Parquet stores: the layout every fusekit store shares.

A store is a folder:

    DIR/manifest.json                    format, settings, fusekit version (written once)
    DIR/part-00000-of-00004.parquet      one shard: a deterministic slice of the work
    DIR/part-00000-of-00004.parquet.json its sidecar: rows, tokens, sha256, … (written after the shard)

A shard is complete when its Parquet file and its sidecar both exist and the file's sha256 equals the
sidecar's. Each shard is written under a temporary name, fsynced and renamed, then its sidecar is
written the same way, so a job killed at any moment leaves either a complete shard or nothing under
the final names. Sidecars (rather than one manifest that every job rewrites) let N independent jobs on
a shared filesystem fill one store without racing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import polars as pl

MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
_TMP_MARK = ".tmp-"
MAX_SHARDS = 99_999  # shard names carry 5 digits
_MISSING_SHOWN = 10  # missing shards named one by one; the rest are counted in one line
# Parquet bytes must not depend on the machine: fixed compression, level and row-group size.
_PARQUET_OPTIONS: dict[str, Any] = dict(compression="zstd", compression_level=9, statistics=False, row_group_size=4096)


class StoreError(Exception):
    """A store that cannot be used as asked: mismatched settings, a corrupt or foreign shard, a full disk."""


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def _write_error(path: Path, exc: OSError) -> StoreError:
    return StoreError(f"cannot write {path}: {exc.strerror or exc} (nothing was left under that name; free space or fix permissions and re-run)")


def _publish(tmp: Path, path: Path) -> None:
    """fsync the finished temporary file and rename it onto its final name."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        _publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None


def write_json_atomic(obj: Any, path: str | Path) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"), path)


def parquet_bytes(df: pl.DataFrame, metadata: dict[str, str] | None = None) -> bytes:
    """`df` as Parquet bytes with the store's fixed options: the same frame always gives the same bytes."""
    buf = io.BytesIO()
    df.write_parquet(buf, metadata=dict(sorted((metadata or {}).items())) or None, **_PARQUET_OPTIONS)
    return buf.getvalue()


def write_parquet_atomic(df: pl.DataFrame, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write `df` to `path` through a temporary file in the same folder; return the file's sha256.

    The same frame and metadata always give the same bytes. The file is serialised in memory and
    written with plain file I/O, so a full disk is an OSError (→ StoreError naming the path), not a
    Polars error, and nothing is left under the final name.
    """
    data = parquet_bytes(df, metadata)
    write_bytes_atomic(data, path)
    return hashlib.sha256(data).hexdigest()


def clean_temporaries(folder: str | Path) -> None:
    """Remove temporary files a killed job of *this* machine left (other live jobs' names carry their pid)."""
    for p in Path(folder).glob(f".*{_TMP_MARK}*"):
        pid = p.name.rsplit(_TMP_MARK, 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        if name in known or _TMP_MARK in name:
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


class ShardLock:
    """An exclusive, non-blocking lock on one shard of a store, so concurrent runs into one folder do not
    both compute it. `acquire()` → True when this process now owns the shard, False when another holds it.

    The lock is `flock` on a hidden file next to the shard (`.NAME.tmp-lock`, skipped by `verify_store`
    and by the folder checks); the kernel drops it when its holder dies, even by kill -9, so a dead
    run never blocks a re-run. On release the file is removed; an acquirer that locked a file which was
    removed meanwhile (its inode no longer at the path) retries on the new one.
    """

    def __init__(self, folder: str | Path, filename: str):
        self.path = Path(folder) / f".{filename}{_TMP_MARK}lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _write_error(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # a filesystem without flock: no protection, but no failure either
                self._fd = fd
                return True
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return True
            os.close(fd)  # the holder released and removed it between our open and flock: try again

    def holder(self) -> str:
        """The pid written by the process holding the lock ('?' when unknown)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "ShardLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
