"""Which files a corpus is, and in which format: DATA as the user gave it, resolved before any text is read.

DATA is one file, a folder or a glob:

- a text file (`.txt` or any other suffix): one text per non-empty line (`lines`);
- a folder (or glob) of text files (`.txt .md .rst .text`): one text per file (`files`);
- JSONL (`.jsonl`, `.json`): one record per line, a text field or chat `messages` (`jsonl`); a folder or
  glob of `.jsonl` files;
- Parquet: one file, a folder or a glob (`parquet`), e.g. the Parquet files of a Hugging Face hub
  dataset's cache (`…/datasets--owner--name`, read at `refs/main`);
- a Hugging Face `datasets` folder written by `save_to_disk` (Arrow files listed in `state.json`), or the
  Arrow files of the `datasets` cache (`arrow`).

Files of a folder or glob are read in the order of their sorted paths (a folder of text files has always
been read so: a store written before keeps its text ids). Mixing formats, or mixing a dataset's splits
(`train-…`, `test-…`), is refused with the glob to give instead: a silent mix would change the corpus.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fusekit.corpus.records import CorpusError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
_KIND_OF_SUFFIX = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
_SPLIT_RE = re.compile(rf"^({'|'.join(_SPLITS)})(?:[-_.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    """A corpus resolved to its files: `kind` is lines, files, jsonl, parquet or arrow; `files` in reading order."""

    kind: str
    files: tuple[Path, ...]
    where: str  # DATA as given, for messages

    def identity(self) -> list[list]:
        """[path, size in bytes, mtime in ns] per file: what says that a saved scan of these files still holds."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def resolve_source(data: str | Path) -> Source:
    """DATA → its Source, or CorpusError saying what is wrong (nothing there, an empty glob, mixed formats
    or splits, a `datasets` folder of another layout)."""
    where = str(data)
    path = Path(data)
    if not path.exists() and any(c in where for c in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(where, recursive=True) if Path(p).is_file())
        if not matches:
            raise CorpusError(f"no files match {where}")
        return _of_files(matches, where, as_folder=True)
    if not path.exists():
        raise CorpusError(f"no data at {path}")
    if path.is_dir():
        return _of_folder(path)
    return _of_files([path], where, as_folder=False)


def _of_folder(path: Path) -> Source:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise CorpusError(
            f"{path} is a `datasets` DatasetDict with the splits {', '.join(splits) or '(none found)'}: "
            f"give one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    if (path / "state.json").is_file():
        return _of_saved_dataset(path)
    if (path / "snapshots").is_dir() and (path / "refs").is_dir():
        return _of_folder(_hub_snapshot(path))
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _of_files(files, str(path), as_folder=True)


def _of_files(files: list[Path], where: str, as_folder: bool) -> Source:
    """One file as its suffix says; several (a folder or glob): all of one format, one split."""
    if not as_folder:
        f = files[0]
        kind = "jsonl" if f.suffix == ".json" else _KIND_OF_SUFFIX.get(f.suffix, "lines")
        return Source(kind, (f,), where)
    by_kind: dict[str, list[Path]] = {}
    for f in files:
        kind = "files" if f.suffix in TEXT_SUFFIXES else _KIND_OF_SUFFIX.get(f.suffix)
        if kind is not None:  # other files (a README.json, a lock file) are not the corpus
            by_kind.setdefault(kind, []).append(f)
    if not by_kind:
        known = ", ".join(sorted(TEXT_SUFFIXES | set(_KIND_OF_SUFFIX)))
        raise CorpusError(f"{where} holds no text files ({known})")
    if len(by_kind) > 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
        raise CorpusError(f"{where} mixes formats ({found} files): give a glob that picks one, e.g. '{where}/**/*.parquet'")
    (kind, chosen), = by_kind.items()
    if kind != "files":
        _one_split(chosen, where)
    return Source(kind, tuple(chosen), where)


def _one_split(files: list[Path], where: str) -> None:
    """Refuse files of several dataset splits (train and test read as one corpus would leak)."""
    root = Path(where) if Path(where).is_dir() else None
    splits: dict[str, Path] = {}
    for f in files:
        parts = f.relative_to(root).parts if root is not None else (f.name,)
        for part in parts:
            m = _SPLIT_RE.match(part)
            if m:
                splits.setdefault(m.group(1).lower(), f)
                break
    if len(splits) > 1:
        names = sorted(splits)
        raise CorpusError(
            f"{where} holds the splits {', '.join(names)} ({', '.join(str(splits[n]) for n in names)}): "
            f"give one, e.g. a glob like '{where}/**/{names[-1]}*'"
        )


def _of_saved_dataset(path: Path) -> Source:
    """A `datasets` folder written by `save_to_disk`: state.json lists its Arrow files in order."""
    try:
        state = json.loads((path / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorpusError(f"{path}/state.json is not a `datasets` save_to_disk state ({exc!r}); another version or format?") from None
    if not names:
        raise CorpusError(f"{path}/state.json lists no data files")
    files = [path / n for n in names]
    other = [n for n in names if not n.endswith(".arrow")]
    if other:
        raise CorpusError(f"{path} is a `datasets` folder of another format ({', '.join(other[:3])}): only Arrow files are read")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CorpusError(f"{path}: state.json lists files that are not there: {', '.join(missing[:3])}")
    return Source("arrow", tuple(files), str(path))


def _hub_snapshot(path: Path) -> Path:
    """The snapshot folder a hub cache entry (`datasets--owner--name`) points at: refs/main, else its only one."""
    ref = path / "refs" / "main"
    if ref.is_file():
        snap = path / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    if len(snaps) != 1:
        raise CorpusError(f"{path} is a hub cache with {len(snaps)} snapshots and no refs/main: give one snapshot folder")
    return snaps[0]
