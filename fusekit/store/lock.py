"""One shard, one writer: a lock that keeps concurrent runs into one folder from computing the same shard."""

from __future__ import annotations

import os
from pathlib import Path

from fusekit.store.atomic import TMP_MARK, write_error


class ShardLock:
    """An exclusive, non-blocking lock on one shard of a store, so concurrent runs into one folder do not
    both compute it. `acquire()` → True when this process now owns the shard, False when another holds it.

    The lock is `flock` on a hidden file next to the shard (`.NAME.tmp-lock`, skipped by `verify_store`
    and by the folder checks); the kernel drops it when its holder dies, even by kill -9, so a dead
    run never blocks a re-run. On release the file is removed; an acquirer that locked a file which was
    removed meanwhile (its inode no longer at the path) retries on the new one.
    """

    def __init__(self, folder: str | Path, filename: str):
        self.path = Path(folder) / f".{filename}{TMP_MARK}lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(self.path, exc) from None
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
