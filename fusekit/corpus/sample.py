"""Texts drawn from the whole corpus with probability proportional to their size, for estimates that read a
bounded amount whatever the corpus size (`fusekit plan`).

A draw picks a byte of the corpus at random and takes the record that holds it, so a text's chance is
its share of the bytes; its weight is the inverse of that chance (Hansen–Hurwitz), and the mean over
draws of weight × q(record) estimates Σ q over the corpus without bias, for any per-record quantity q
(tokens, windows, texts). Tokens per byte vary little from text to text, so texts of very different
lengths do not make the estimate noisy. Where bytes are not addressable one by one (Parquet, Arrow), a
row group (batch) is drawn by its text column's uncompressed size from the footer, then texts in it by
their UTF-8 length (one streaming pass over that row group only); the draws of one row group form a
cluster, and the error is computed over clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusekit.corpus.columnar import batch_rows, parquet_file
from fusekit.corpus.lines import file_record, line_records
from fusekit.corpus.records import CorpusStats, Record
from fusekit.corpus.sources import Source

_BACK = 1 << 14  # bytes read backwards at a time to find a line's start
Z95 = 1.96


@dataclass
class Draw:
    """One draw: the records of the drawn unit (a line, a file, a row), the inverse of its chance, its cluster."""

    records: list[Record]
    weight: float  # 1 / P(this unit is drawn), in draws of one
    cluster: int
    key: tuple  # where it is in the corpus: (file, byte offset or row group, row)


def draw(source: Source, field: str, n: int, rng: np.random.Generator, per_cluster: int = 8, first_cluster: int = 0) -> list[Draw]:
    """`n` draws (with replacement) from the whole corpus; columnar formats draw ⌈n / per_cluster⌉ row groups."""
    if source.kind in ("lines", "jsonl"):
        return _draw_lines(source, field, n, rng, first_cluster)
    if source.kind == "files":
        return _draw_files(source, n, rng, first_cluster)
    return _draw_columnar(source, field, n, rng, per_cluster, first_cluster)


def estimate(draws: Sequence[Draw], values: Sequence[float]) -> tuple[float, float]:
    """(estimated corpus total of a quantity, its 95 % half-width) from `values[i]` = the quantity in draws[i]'s records."""
    by_cluster: dict[int, list[float]] = {}
    for d, v in zip(draws, values):
        by_cluster.setdefault(d.cluster, []).append(d.weight * v)
    means = np.array([np.mean(v) for v in by_cluster.values()])
    total = float(means.mean())
    half = Z95 * float(means.std(ddof=1)) / math.sqrt(len(means)) if len(means) > 1 else math.inf
    return total, half


def _sizes(source: Source) -> np.ndarray:
    return np.array([f.stat().st_size for f in source.files], dtype=np.int64)


def _draw_lines(source: Source, field: str, n: int, rng, first_cluster: int) -> list[Draw]:
    sizes = _sizes(source)
    cum = np.cumsum(sizes)
    total = int(cum[-1]) if len(cum) else 0
    out = []
    for j, u in enumerate(np.sort(rng.integers(0, max(total, 1), size=n))):
        fi = int(np.searchsorted(cum, u, side="right"))
        offset = int(u - (cum[fi - 1] if fi else 0))
        start, raw = _line_at(source.files[fi], offset)
        records = line_records(raw, source.kind, field, f"{source.files[fi]} at byte {start}", CorpusStats())
        out.append(Draw(records, total / len(raw), first_cluster + j, (fi, start, 0)))
    return out


def _line_at(path, offset: int) -> tuple[int, bytes]:
    """(start, bytes with its b"\\n") of the line of `path` that holds byte `offset`."""
    with path.open("rb") as fh:
        start = offset
        while start > 0:
            lo = max(0, start - _BACK)
            fh.seek(lo)
            chunk = fh.read(start - lo)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = lo + cut + 1
                break
            start = lo
        fh.seek(start)
        return start, fh.readline()


def _draw_files(source: Source, n: int, rng, first_cluster: int) -> list[Draw]:
    sizes = _sizes(source)
    cum = np.cumsum(sizes)
    total = int(cum[-1])
    out = []
    for j, u in enumerate(np.sort(rng.integers(0, max(total, 1), size=n))):
        fi = int(np.searchsorted(cum, u, side="right"))
        record = file_record(source.files[fi], CorpusStats())
        out.append(Draw([record] if record else [], total / max(int(sizes[fi]), 1), first_cluster + j, (fi, 0, 0)))
    return out


def _units(source: Source, field: str) -> list[tuple[int, int, int]]:
    """(file, row group or batch, size of the text column in bytes) for every unit of a columnar source."""
    units = []
    for fi, path in enumerate(source.files):
        if source.kind == "parquet":
            meta = parquet_file(path).metadata
            col = parquet_file(path).schema_arrow.get_field_index(field)
            units.extend((fi, g, meta.row_group(g).column(col).total_uncompressed_size) for g in range(meta.num_row_groups))
        else:
            for b, batch in enumerate(_arrow_batches(path)):
                units.append((fi, b, batch.column(batch.schema.get_field_index(field)).nbytes))
    return units


def _arrow_batches(path):
    import pyarrow as pa

    source = pa.memory_map(str(path))  # zero-copy: sizing a batch touches none of its text
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return (reader.get_batch(i) for i in range(reader.num_record_batches))


def _draw_columnar(source: Source, field: str, n: int, rng, per_cluster: int, first_cluster: int) -> list[Draw]:
    units = _units(source, field)
    sizes = np.array([u[2] for u in units], dtype=np.float64)
    total = float(sizes.sum())
    if total <= 0:
        return []
    k = max(1, math.ceil(n / per_cluster))
    chosen, times = np.unique(rng.choice(len(units), size=k, p=sizes / total), return_counts=True)
    out: list[Draw] = []
    cluster = first_cluster
    for unit, repeat in zip(chosen, times):
        fi, g, size = units[unit]
        # A unit drawn r times is r clusters of per_cluster draws each, read in one pass.
        picked, unit_bytes = _reservoir(source, fi, g, field, per_cluster * int(repeat), rng)
        for i, (row, text, length) in enumerate(picked):
            weight = (total / size) * (unit_bytes / length) if length else 0.0
            record = [Record(text=text)] if isinstance(text, str) and text.strip() else []
            out.append(Draw(record, weight, cluster + i // per_cluster, (fi, g, row)))
        cluster += int(repeat)
    return out


def _reservoir(source: Source, fi: int, g: int, field: str, m: int, rng) -> tuple[list[tuple[int, str | None, int]], int]:
    """m rows of unit (fi, g) drawn with replacement by UTF-8 length, in one streaming pass; and the unit's text bytes."""
    import pyarrow.compute as pc

    slots: list[tuple[int, str | None, int]] = [(0, None, 0)] * m
    seen = 0
    row0 = 0
    for batch in _unit_batches(source, fi, g, field):
        col = batch.column(batch.schema.get_field_index(field))
        lengths = pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64) if len(col) else np.zeros(0, np.int64)
        here = int(lengths.sum())
        seen += here
        if here:
            replace = np.flatnonzero(rng.random(m) < here / seen)
            if replace.size:
                cum = np.cumsum(lengths)
                rows = np.searchsorted(cum, rng.integers(0, here, size=replace.size), side="right")
                for s, r in zip(replace, rows):
                    slots[s] = (row0 + int(r), col[int(r)].as_py(), int(lengths[r]))
        row0 += len(col)
    return slots, seen


def _unit_batches(source: Source, fi: int, g: int, field: str):
    path = source.files[fi]
    if source.kind == "parquet":
        pf = parquet_file(path)
        rows = batch_rows(pf.metadata.row_group(g), pf.schema_arrow.get_field_index(field))
        yield from pf.iter_batches(batch_size=rows, row_groups=[g], columns=[field], use_threads=False)
        return
    for b, batch in enumerate(_arrow_batches(path)):
        if b == g:
            yield batch
            return


def chunk_of(text: str, rng, chunk_chars: int) -> tuple[str, float]:
    """(text, 1.0) for a text of at most `chunk_chars` characters; else one of its chunks of `chunk_chars`
    characters drawn by bytes, and the text's bytes over the chunk's. A count per byte of the chunk times
    that scale estimates the text's count without bias (but for the chunk edges: a word cut in two), so a
    drawn book costs a page."""
    if len(text) <= chunk_chars:
        return text, 1.0
    chunks = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    sizes = np.array([len(c.encode("utf-8")) for c in chunks], dtype=np.int64)
    cum = np.cumsum(sizes)
    k = int(np.searchsorted(cum, rng.integers(0, int(cum[-1])), side="right"))
    return chunks[k], float(cum[-1]) / float(sizes[k])
