"""The aligned store's format and writer: every fusion candidate on the target's tokens, one Parquet row per target window.

Layout (the shared store rules of `shards.py`: manifest, `part-IIIII-of-NNNNN.parquet` shards by text
id, a sidecar per shard, atomic writes, byte-identical on re-run) plus `report.json`, and where a source
uses the `fusechat` method the folder `fusechat-counts/`: its alignment counts over the corpus, counted
once in parts by whichever of the store's jobs got there first (`fusekit.align.corpus_statmap.corpus_counts`).

One row per target window, in (text_id, window) order. Columns:

    text_id Int64, window Int32, char_start Int64, char_end Int64, n Int32 (tokens in the window)
    input_ids   List(Int32)   the target's tokens
    has_mask    Boolean       whether the window carries a loss mask
    loss_mask   List(Boolean) n entries when has_mask, else empty
    c{c}_ids    List(Int32)   candidate c's top-k ids in the target vocabulary, row-major [n, k_c], −1 = empty
    c{c}_probs  List(Float16) its probabilities [n, k_c] (renormalised to sum 1 per row on reading)
    c{c}_ce     List(Float32) its CE per position [n]; NaN where a source fell back (and at the end)
    c{c}_mean_ce Float64      its mean CE over the window (the window-level fusion metric)
    c{c}_mass   List(Float32) per position [n], the mass the row's kept entries held before they were
                              renormalised (`Candidate.mass`: 1 on a one-hot fallback, 0 on an empty row);
                              format version 3 on. Float32, not Float16: the divergence losses take the
                              teacher's rest as 1 − mass, and online distillation computes the same value
                              unquantised.

Version 2 stores (no `c{c}_mass`) are still read: their candidates have no mass (`Candidate.mass` None,
read as 1 on every row that holds probability: nothing outside the kept ids). `write_windows` writes the
version its settings name (`format_version`, default `FORMAT_VERSION`), so a version-2 store can still be
written for older readers.

Candidate 0 is the target itself, then the sources in the order given to `fusekit align`; k_c is in
the manifest (`settings.ks`). Row groups hold `settings.row_group_rows` windows, so a random read
decodes one row group, not the shard: the reader keeps at most one decoded row group (random access)
or one decoded shard (sequential iteration) in memory. The writer (`stream_shard`) likewise takes the
rows a row group at a time; the trainer reads whole row groups (`group_bounds`, `read_group`) and
shuffles within a buffer of them (`fusekit.train.shuffle`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from fusekit.store.atomic import PARQUET_OPTIONS, write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.store.shards import open_store, record_shard, shard_filename
from fusekit.store.types import AlignedWindow, row_mass

FORMAT = "fusekit-aligned"
# zstd level 5, not the other stores' 9: alignment is a CPU job run over whole corpora, and level 9 spent
# ~15% of its CPU time on compression for files 2.5% smaller (benchmarks/bench_align_store.py). Any
# level reads the same; the bytes still depend on nothing but the rows.
ALIGNED_PARQUET_OPTIONS = dict(PARQUET_OPTIONS, compression_level=5)
FORMAT_VERSION = 3  # 2: settings name each source's method; byte-span candidates. 3: c{c}_mass
MASS_VERSION = 3  # the first version with the c{c}_mass columns
REPORT = "report.json"
COUNTS_DIR = "fusechat-counts"  # the `fusechat` method's alignment counts, shared by the store's jobs
CODEC_NOTE = (
    "one row per target window; c{c}_ids/probs are row-major [n, k_c] (int32 target ids, -1 empty; "
    "float16 probabilities), c{c}_ce per position (NaN = fell back), c0 = the target, then the sources"
)
CODEC_NOTE_MASS = CODEC_NOTE + "; c{c}_mass per position: the kept entries' mass before renormalising (float32)"


def has_mass(format_version: int | str | None) -> bool:
    """Whether a store of `format_version` (None: before versions were recorded) has the c{c}_mass columns."""
    return format_version is not None and int(format_version) >= MASS_VERSION


def row_group_rows(max_length: int) -> int:
    """Windows per row group: about 64k target tokens, so one random read decodes a few MB."""
    return max(1, min(1024, 65536 // max(1, int(max_length))))


def _list(name: str, arrays: Sequence[np.ndarray], dtype: pl.DataType) -> pl.Series:
    # Equal-length arrays become an Array column even when a List is asked for: the cast keeps the schema
    # independent of the data.
    return pl.Series(name, list(arrays), dtype=pl.List(dtype)).cast(pl.List(dtype)) if arrays else pl.Series(name, [], dtype=pl.List(dtype))


def windows_frame(
    windows: Sequence[AlignedWindow], ks: Sequence[int], spans: Sequence[tuple[int, int]] | None = None, with_mass: bool = True
) -> pl.DataFrame:
    """The rows of one shard; `spans` are the windows' (char_start, char_end) in their texts. `with_mass`:
    write the c{c}_mass columns (format version 3; a candidate without a mass writes `row_mass`'s)."""
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
            if with_mass and cand.mass is not None and np.shape(cand.mass) != (len(w.input_ids),):
                raise StoreError(f"candidate {c} of (text {w.text_id}, window {w.window}) has mass of shape {np.shape(cand.mass)}, expected ({len(w.input_ids)},)")
        cols[f"c{c}_ids"] = _list(f"c{c}_ids", [np.asarray(x.ids, dtype=np.int32).ravel() for x in cands], pl.Int32)
        cols[f"c{c}_probs"] = _list(f"c{c}_probs", [np.asarray(x.probs, dtype=np.float16).ravel() for x in cands], pl.Float16)
        cols[f"c{c}_ce"] = _list(f"c{c}_ce", [np.asarray(x.ce, dtype=np.float32) for x in cands], pl.Float32)
        cols[f"c{c}_mean_ce"] = pl.Series(f"c{c}_mean_ce", [float(x.mean_ce) for x in cands], dtype=pl.Float64)
        if with_mass:
            cols[f"c{c}_mass"] = _list(f"c{c}_mass", [row_mass(x) for x in cands], pl.Float32)
    return pl.DataFrame(list(cols.values()))


def encode_shard(df: pl.DataFrame, rows_per_group: int, metadata: dict[str, str]) -> bytes:
    """The shard's Parquet bytes; the same frame always gives the same bytes (fixed options)."""
    buf = io.BytesIO()
    options = dict(ALIGNED_PARQUET_OPTIONS, row_group_size=rows_per_group)
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

    options = dict(ALIGNED_PARQUET_OPTIONS, row_group_size=rows_per_group)
    register_io_source(source, schema=schema).sink_parquet(fh, metadata=dict(sorted(metadata.items())), **options)


def shard_metadata(settings: dict) -> dict[str, str]:
    version = settings.get("format_version", FORMAT_VERSION)
    return {
        "fusekit.format": FORMAT,
        "fusekit.format_version": str(version),
        "fusekit.codec": CODEC_NOTE_MASS if has_mass(version) else CODEC_NOTE,
        "fusekit.ks": json.dumps(list(settings["ks"])),
    }


WINDOW_COLUMNS = ["text_id", "window", "has_mask", "input_ids", "loss_mask"]


def candidate_columns(ks: Sequence[int], with_mass: bool = True) -> list[str]:
    parts = ("ids", "probs", "ce", "mean_ce", *(("mass",) if with_mass else ()))
    return [f"c{c}_{part}" for c in range(len(ks)) for part in parts]


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
        frame = windows_frame(part, full["ks"], with_mass=has_mass(full["format_version"]))
        data = encode_shard(frame, int(full["row_group_rows"]), shard_metadata(full))
        name = shard_filename(i, int(num_shards))
        write_bytes_atomic(data, folder / name)
        info = {"rows": len(part), "tokens": int(sum(len(w.input_ids) for w in part)), "sha256": hashlib.sha256(data).hexdigest()}
        record_shard(folder, name, info)
    return folder
