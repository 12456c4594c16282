"""The aligned store: every fusion candidate on the target's tokens, one Parquet row per target window.

Layout (the shared store rules of `shards.py`: manifest, `part-IIIII-of-NNNNN.parquet` shards by text
id, a sidecar per shard, atomic writes, byte-identical on re-run) plus `report.json`, and where a source
uses the `fusechat` method the folder `fusechat-counts/`: its alignment counts over the corpus, counted
once in parts by whichever of the store's jobs got there first (`fusekit.align.statmap.corpus_counts`).

One row per target window, in (text_id, window) order. Columns:

    text_id Int64, window Int32, char_start Int64, char_end Int64, n Int32 (tokens in the window)
    input_ids   List(Int32)   the target's tokens
    has_mask    Boolean       whether the window carries a loss mask
    loss_mask   List(Boolean) n entries when has_mask, else empty
    c{c}_ids    List(Int32)   candidate c's top-k ids in the target vocabulary, row-major [n, k_c], −1 = empty
    c{c}_probs  List(Float16) its probabilities [n, k_c] (renormalised to sum 1 per row on reading)
    c{c}_ce     List(Float32) its CE per position [n]; NaN where a source fell back (and at the end)
    c{c}_mean_ce Float64      its mean CE over the window (the window-level fusion metric)

Candidate 0 is the target itself, then the sources in the order given to `fusekit align`; k_c is in
the manifest (`settings.ks`). Row groups hold `settings.row_group_rows` windows, so a random read
decodes one row group, not the shard: the reader keeps at most one decoded row group (random access)
or one decoded shard (sequential iteration) in memory. The writer (`stream_shard`) likewise takes the
rows a row group at a time; the trainer reads whole row groups (`group_bounds`, `read_group`) and
shuffles within a buffer of them (`fusekit.train.shuffle`).

Opening a store does not hash it: each shard's sha256 was checked when it was written (or by
`fusekit inspect`), and a shard edited since then is newer than its sidecar, which the reader sees from
file times alone and answers by hashing that shard (`shards.shard_is_stamped`): start-up costs the same
for a store of any size, and an edited shard is refused, named.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from fusekit.store.atomic import PARQUET_OPTIONS, write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.store.shards import (
    complete_shards,
    edited_manifest_error,
    foreign_sidecars,
    open_store,
    read_manifest,
    record_shard,
    sha256_file,
    shard_count,
    shard_filename,
    shard_is_stamped,
    stamp_shard,
)
from fusekit.store.types import AlignedWindow, Candidate

FORMAT = "fusekit-aligned"
FORMAT_VERSION = 2  # 2: settings name each source's method; byte-span candidates
REPORT = "report.json"
COUNTS_DIR = "fusechat-counts"  # the `fusechat` method's alignment counts, shared by the store's jobs
CODEC_NOTE = (
    "one row per target window; c{c}_ids/probs are row-major [n, k_c] (int32 target ids, -1 empty; "
    "float16 probabilities), c{c}_ce per position (NaN = fell back), c0 = the target, then the sources"
)


def row_group_rows(max_length: int) -> int:
    """Windows per row group: about 64k target tokens, so one random read decodes a few MB."""
    return max(1, min(1024, 65536 // max(1, int(max_length))))


def _list(name: str, arrays: Sequence[np.ndarray], dtype: pl.DataType) -> pl.Series:
    # Equal-length arrays become an Array column even when a List is asked for: the cast keeps the schema
    # independent of the data.
    return pl.Series(name, list(arrays), dtype=pl.List(dtype)).cast(pl.List(dtype)) if arrays else pl.Series(name, [], dtype=pl.List(dtype))


def windows_frame(windows: Sequence[AlignedWindow], ks: Sequence[int], spans: Sequence[tuple[int, int]] | None = None) -> pl.DataFrame:
    """The rows of one shard; `spans` are the windows' (char_start, char_end) in their texts."""
    spans = list(spans) if spans is not None else [(0, 0)] * len(windows)
    for w in windows:
        if len(w.candidates) != len(ks):
            raise StoreError(f"window (text {w.text_id}, window {w.window}) has {len(w.candidates)} candidates, expected {len(ks)}")
    cols: dict[str, pl.Series] = {
        "text_id": pl.Series("text_id", [w.text_id for w in windows], dtype=pl.Int64),
        "window": pl.Series("window", [w.window for w in windows], dtype=pl.Int32),
        "char_start": pl.Series("char_start", [a for a, _ in spans], dtype=pl.Int64),
        "char_end": pl.Series("char_end", [b for _, b in spans], dtype=pl.Int64),
        "n": pl.Series("n", [len(w.input_ids) for w in windows], dtype=pl.Int32),
        "input_ids": _list("input_ids", [np.asarray(w.input_ids, dtype=np.int32) for w in windows], pl.Int32),
        "has_mask": pl.Series("has_mask", [w.loss_mask is not None for w in windows], dtype=pl.Boolean),
        "loss_mask": _list(
            "loss_mask",
            [np.asarray(w.loss_mask, dtype=bool) if w.loss_mask is not None else np.zeros(0, dtype=bool) for w in windows],
            pl.Boolean,
        ),
    }
    for c, k in enumerate(ks):
        cands = [w.candidates[c] for w in windows]
        for cand, w in zip(cands, windows):
            if cand.ids.shape != (len(w.input_ids), k):
                raise StoreError(f"candidate {c} of (text {w.text_id}, window {w.window}) has shape {cand.ids.shape}, expected ({len(w.input_ids)}, {k})")
        cols[f"c{c}_ids"] = _list(f"c{c}_ids", [np.asarray(x.ids, dtype=np.int32).ravel() for x in cands], pl.Int32)
        cols[f"c{c}_probs"] = _list(f"c{c}_probs", [np.asarray(x.probs, dtype=np.float16).ravel() for x in cands], pl.Float16)
        cols[f"c{c}_ce"] = _list(f"c{c}_ce", [np.asarray(x.ce, dtype=np.float32) for x in cands], pl.Float32)
        cols[f"c{c}_mean_ce"] = pl.Series(f"c{c}_mean_ce", [float(x.mean_ce) for x in cands], dtype=pl.Float64)
    return pl.DataFrame(list(cols.values()))


def encode_shard(df: pl.DataFrame, rows_per_group: int, metadata: dict[str, str]) -> bytes:
    """The shard's Parquet bytes; the same frame always gives the same bytes (fixed options)."""
    buf = io.BytesIO()
    options = dict(PARQUET_OPTIONS, row_group_size=rows_per_group)
    df.write_parquet(buf, metadata=dict(sorted(metadata.items())), **options)
    return buf.getvalue()


def stream_shard(frames: Iterable[pl.DataFrame], schema: pl.Schema, fh: BinaryIO, rows_per_group: int, metadata: dict[str, str]) -> None:
    """Write `frames`, one per row group, into the open file `fh` as a shard's Parquet file, each as it
    comes: memory holds one row group, not the shard. Each frame must hold exactly `rows_per_group` rows
    (the last may hold fewer; ValueError otherwise) and be built for itself, not sliced from a larger
    frame: Polars sizes a row group's data pages from the buffers of the frame it cuts the rows from, so
    the same rows built alone always give the same bytes, whoever produced them. A shard of one row
    group is byte for byte `encode_shard`'s. An exception raised while producing the frames propagates
    as it is.
    """
    from polars.io.plugins import register_io_source

    def source(with_columns, predicate, n_rows, batch_size) -> Iterator[pl.DataFrame]:  # noqa: ARG001 (nothing is pushed down)
        short = None
        for frame in frames:
            if short is not None or frame.height > rows_per_group:
                raise ValueError(f"stream_shard takes frames of {rows_per_group} rows, one per row group (only the last shorter)")
            if frame.height < rows_per_group:
                short = frame.height
            yield frame

    options = dict(PARQUET_OPTIONS, row_group_size=rows_per_group)
    register_io_source(source, schema=schema).sink_parquet(fh, metadata=dict(sorted(metadata.items())), **options)


def shard_metadata(settings: dict) -> dict[str, str]:
    return {
        "fusekit.format": FORMAT,
        "fusekit.format_version": str(FORMAT_VERSION),
        "fusekit.codec": CODEC_NOTE,
        "fusekit.ks": json.dumps(list(settings["ks"])),
    }


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class _Flat:
    values: np.ndarray
    starts: np.ndarray  # per row, into values

    @classmethod
    def of(cls, col: pl.Series) -> "_Flat":
        lens = col.list.len().to_numpy().astype(np.int64)
        starts = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        return cls(col.explode(empty_as_null=False).to_numpy(), starts)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.starts[i] : self.starts[i + 1]]


WINDOW_COLUMNS = ["text_id", "window", "has_mask", "input_ids", "loss_mask"]


def candidate_columns(ks: Sequence[int]) -> list[str]:
    return [f"c{c}_{part}" for c in range(len(ks)) for part in ("ids", "probs", "ce", "mean_ce")]


def _normalised(probs: np.ndarray, k: int) -> np.ndarray:
    """float16 probabilities [positions · k] → float32 [positions, k], each row renormalised to sum 1
    (float16 rounding leaves rows a few 1e-4 off 1; fusion expects exact distributions); done once per
    decoded block, not per window."""
    p = probs.astype(np.float32).reshape(-1, k)
    total = p[:, 0].copy()
    for j in range(1, k):  # k column adds: several times faster than a sum over a short last axis
        total += p[:, j]
    total[total == 0] = 1.0  # an empty row stays 0
    p /= total[:, None]
    return p


class _Decoded:
    """A decoded block of rows (a row group or a whole shard) as flat numpy arrays.

    A block read without the candidate columns gives windows without candidates (training on CLM alone).
    """

    def __init__(self, df: pl.DataFrame, ks: Sequence[int]):
        self.ks = list(ks)
        self.text_id = df["text_id"].to_numpy()
        self.window = df["window"].to_numpy()
        self.has_mask = df["has_mask"].to_numpy()
        self.input_ids = _Flat.of(df["input_ids"])
        self.mask = _Flat.of(df["loss_mask"])
        with_candidates = bool(self.ks) and "c0_ids" in df.columns
        self.cands = [
            (_Flat.of(df[f"c{c}_ids"]), _normalised(_Flat.of(df[f"c{c}_probs"]).values, k), _Flat.of(df[f"c{c}_ce"]), df[f"c{c}_mean_ce"].to_numpy())
            for c, k in enumerate(self.ks)
        ] if with_candidates else []

    def __len__(self) -> int:
        return len(self.text_id)

    def window_at(self, i: int) -> AlignedWindow:
        ids = self.input_ids.row(i).astype(np.int64)
        n = len(ids)
        at = int(self.input_ids.starts[i])  # the window's first position; candidates hold n positions each too
        cands = []
        for k, (c_ids, c_probs, c_ce, c_mean) in zip(self.ks, self.cands):
            cands.append(
                Candidate(
                    ids=c_ids.row(i).reshape(n, k).copy(),
                    probs=c_probs[at : at + n].copy(),
                    ce=c_ce.row(i).copy(),
                    mean_ce=float(c_mean[i]),
                )
            )
        mask = self.mask.row(i).astype(bool) if self.has_mask[i] else None
        return AlignedWindow(text_id=int(self.text_id[i]), window=int(self.window[i]), input_ids=ids, candidates=cands, loss_mask=mask)


class AlignedStore:
    """Read an aligned store folder: `len`, random access `store[i]`, `window_lengths()`, `iter_windows()`,
    and whole row groups (`group_bounds()`, `read_group(g)`).

    `check=False` skips the shard check of the module docstring (a worker process whose parent opened
    the same store a moment ago). Raises StoreError for an incomplete store, an edited manifest, or a
    shard changed since it was verified (the file named).
    """

    def __init__(self, folder: str | Path, check: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"no aligned store at {self.folder}: run `fusekit align` first, or check the path")
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.folder} holds a {self.manifest.get('format')!r} store, not an aligned store ({FORMAT!r})")
        self.settings: dict = self.manifest.get("settings", {})
        try:
            self.ks: list[int] = [int(k) for k in self.settings["ks"]]
            self.rows_per_group = int(self.settings["row_group_rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.folder / 'manifest.json'} lacks a valid setting {exc}; the store is damaged") from None
        self.num_shards = shard_count(self.folder, self.settings)
        done = complete_shards(self.folder)
        names = [shard_filename(i, self.num_shards) for i in range(self.num_shards)]
        missing = [i for i, name in enumerate(names) if name not in done]
        if missing and not done:
            foreign = foreign_sidecars(self.folder)
            if foreign:
                raise edited_manifest_error(self.folder, foreign)
        if missing:
            shown = ", ".join(f"{i}/{self.num_shards}" for i in missing[:8])
            raise StoreError(
                f"{self.folder} is incomplete: {len(missing)} of {self.num_shards} shards are missing ({shown}"
                f"{', …' if len(missing) > 8 else ''}); finish `fusekit align` (re-run it, or run the missing --shard I/N)"
            )
        self._files = [self.folder / name for name in names]
        if check:
            for name in names:
                self._check_shard(name, done[name].get("sha256"))
        self._rows = np.array([int(done[name]["rows"]) for name in names], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)])
        self._cached: tuple[int, int] | None = None
        self._block: _Decoded | None = None
        self._lengths: np.ndarray | None = None
        self.groups_read = 0  # row groups decoded by `read_group` (the trainer's reads), for the record

    def _check_shard(self, name: str, sha: str | None) -> None:
        """Hash a shard that changed since it was verified; refuse it, named, when its bytes differ."""
        if shard_is_stamped(self.folder, name):
            return
        path = self.folder / name
        try:
            ok = sha256_file(path) == sha
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not ok:
            raise StoreError(
                f"{path}: sha256 mismatch (the shard was changed after it was written or verified, or is corrupt; "
                "delete it and re-run `fusekit align`)"
            )
        stamp_shard(self.folder, name)

    @property
    def n_candidates(self) -> int:
        return len(self.ks)

    @property
    def report(self) -> dict | None:
        path = self.folder / REPORT
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, i: int, **scan) -> pl.DataFrame:
        """Shard i (or a slice of it: `scan` = offset, length, columns); an unreadable shard is a
        StoreError naming the file."""
        path = self._files[i]
        try:
            frame = pl.scan_parquet(path)
            if "columns" in scan:
                frame = frame.select(scan["columns"])
            if "offset" in scan:
                frame = frame.slice(scan["offset"], scan["length"])
            return frame.collect()
        except Exception as exc:  # polars' own error types
            raise StoreError(f"{path} cannot be read as Parquet ({str(exc).splitlines()[0]}); delete it and re-run `fusekit align`") from None

    def window_lengths(self) -> np.ndarray:
        """Tokens per window, in store order (reads only the `n` column)."""
        if self._lengths is None:
            parts = [self._shard(i, columns=["n"])["n"].to_numpy() for i in range(len(self._files))]
            self._lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return self._lengths

    def group_bounds(self) -> np.ndarray:
        """Row groups as store-order window ranges: group g holds windows [b[g], b[g+1]), int64 [groups + 1].

        A group never spans two shards (each shard's last group may be short).
        """
        r = self.rows_per_group
        starts = [self._starts[s] + np.arange(0, int(rows), r) for s, rows in enumerate(self._rows) if rows]
        return np.concatenate([*starts, [len(self)]]).astype(np.int64)

    def read_group(self, start: int, stop: int, candidates: bool = True) -> _Decoded:
        """Decode store-order windows [start, stop) — one row group from `group_bounds` — in one read.

        `candidates=False` reads the tokens and loss masks only (CLM training needs no fusion target).
        """
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        local = start - int(self._starts[shard])
        columns = WINDOW_COLUMNS + (candidate_columns(self.ks) if candidates else [])
        df = self._shard(shard, offset=local, length=stop - start, columns=columns)
        self.groups_read += 1
        return _Decoded(df, self.ks)

    def __getitem__(self, index: int) -> AlignedWindow:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {index} is out of range: the store holds {n} windows")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        local = i - int(self._starts[shard])
        group = local // self.rows_per_group
        if self._cached != (shard, group):
            self._block = None  # drop the old block before decoding the next one
            start = group * self.rows_per_group
            df = self._shard(shard, offset=start, length=self.rows_per_group)
            self._block, self._cached = _Decoded(df, self.ks), (shard, group)
        return self._block.window_at(local - group * self.rows_per_group)

    def iter_windows(self) -> Iterator[AlignedWindow]:
        """Every window in store order, one decoded shard at a time."""
        for i in range(len(self._files)):
            block = _Decoded(self._shard(i), self.ks)
            for i in range(len(block)):
                yield block.window_at(i)
            del block


# ---------------------------------------------------------------------------------------------- writing


def write_windows(
    folder: str | Path,
    windows: Sequence[AlignedWindow],
    ks: Sequence[int],
    num_shards: int = 1,
    settings: dict | None = None,
) -> Path:
    """An aligned store of `windows` (in store order, split into `num_shards` contiguous shards), written
    in one piece (`windows_frame` → `encode_shard` → atomic file → sidecar; `fusekit align` streams the same
    layout a row group at a time, `stream_shard`, which is these bytes for shards of one row group).

    For windows that come from elsewhere (tests, benchmarks, a converter); `settings` adds manifest
    settings (e.g. `target`). Returns the folder.
    """
    folder = Path(folder)
    max_length = max((len(w.input_ids) for w in windows), default=1)
    full = {
        "format_version": FORMAT_VERSION,
        "num_shards": int(num_shards),
        "row_group_rows": row_group_rows(max_length),
        "ks": [int(k) for k in ks],
        **(settings or {}),
    }
    full = open_store(folder, FORMAT, full)["settings"]
    bounds = np.linspace(0, len(windows), int(num_shards) + 1).round().astype(int)
    for i in range(int(num_shards)):
        part = list(windows[bounds[i] : bounds[i + 1]])
        data = encode_shard(windows_frame(part, full["ks"]), int(full["row_group_rows"]), shard_metadata(full))
        name = shard_filename(i, int(num_shards))
        write_bytes_atomic(data, folder / name)
        info = {"rows": len(part), "tokens": int(sum(len(w.input_ids) for w in part)), "sha256": hashlib.sha256(data).hexdigest()}
        record_shard(folder, name, info)
    return folder
