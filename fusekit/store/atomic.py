"""Writes a kill cannot tear: every store file goes to a temporary name, is fsynced, then renamed.

A job killed at any moment leaves either the whole file under its final name or nothing there; the
temporaries it leaves carry its pid (`.NAME.tmp-PID`), so a later run of this machine removes those of
dead jobs only (`clean_temporaries`). Parquet bytes depend only on the frame and its metadata
(`parquet_bytes`), so a re-run writes byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import polars as pl

from fusekit.store.errors import StoreError

TMP_MARK = ".tmp-"  # in every temporary's name (and the shard locks'): readers and checks skip them
# Parquet bytes must not depend on the machine: fixed compression, level and row-group size.
PARQUET_OPTIONS: dict[str, Any] = dict(compression="zstd", compression_level=9, statistics=False, row_group_size=4096)


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
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_error(path: Path, exc: OSError) -> StoreError:
    """The StoreError of a failed write: names the file and says nothing was left under its name."""
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
        raise write_error(path, exc) from None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """An open binary file whose contents appear under `path` only when the block ends without an
    exception (written to the temporary `.NAME.tmp-PID`, fsynced, renamed); on an exception the temporary
    is removed and nothing is left under `path`. An OSError (full disk, permissions) becomes the
    StoreError of `write_error`, whatever wrapped it."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
        _publish(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc.__cause__, OSError) else None
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def write_json_atomic(obj: Any, path: str | Path) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"), path)


def parquet_bytes(df: pl.DataFrame, metadata: dict[str, str] | None = None) -> bytes:
    """`df` as Parquet bytes with the store's fixed options: the same frame always gives the same bytes."""
    buf = io.BytesIO()
    df.write_parquet(buf, metadata=dict(sorted((metadata or {}).items())) or None, **PARQUET_OPTIONS)
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
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
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
