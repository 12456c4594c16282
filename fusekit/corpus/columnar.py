"""Streaming readers of the columnar formats (Parquet, `datasets` Arrow files), from any part.

Only the text column is read, one record batch at a time (Parquet: page by page, no pre-buffering of a
whole row group), so memory holds one batch whatever the corpus or row group size. A null, empty or
whitespace-only value is a skipped text, as in a whole-file read. Every file's schema is checked before
any text is read: a damaged file, or one without the text column, is named at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from fusekit.corpus.parts import Part
from fusekit.corpus.records import CorpusError, CorpusStats, Record
from fusekit.corpus.sources import Source

BATCH_ROWS = 1024  # rows per record batch at most
BATCH_BYTES = 4 * 2**20  # and about this much text: long texts come in smaller batches
_READ_BUFFER = 1 << 20  # bytes read at a time from a Parquet column chunk


def _is_text(dtype) -> bool:
    import pyarrow as pa

    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(dtype)
    )


def parquet_file(path: Path):
    """The opened ParquetFile (footer read), or CorpusError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER)
    except Exception as exc:  # pyarrow raises its own types for damaged files
        raise CorpusError(f"cannot read {path} as Parquet: {exc}") from None


def _arrow_reader(path: Path):
    """A record batch reader of an Arrow IPC stream (what `datasets` writes) or file."""
    import pyarrow as pa

    try:
        source = pa.OSFile(str(path))  # read, not memory-mapped: pages read stay out of RSS once freed
        try:
            return pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source = pa.OSFile(str(path))
            file_reader = pa.ipc.open_file(source)
            return _FileBatches(file_reader)
    except Exception as exc:
        raise CorpusError(f"cannot read {path} as Arrow: {exc}") from None


class _FileBatches:
    """An Arrow IPC *file* read batch by batch, like a stream reader."""

    def __init__(self, reader):
        self.schema = reader.schema
        self._reader = reader

    def __iter__(self):
        return (self._reader.get_batch(i) for i in range(self._reader.num_record_batches))


def check_columns(source: Source, field: str) -> None:
    """Every file opens and has `field` as a text column; else CorpusError naming the file and its columns."""
    schemas = []
    for path in source.files:
        schema = parquet_file(path).schema_arrow if source.kind == "parquet" else _arrow_reader(path).schema
        schemas.append((path, schema))
    with_field = [p for p, s in schemas if field in s.names]
    for path, schema in schemas:
        if field not in schema.names:
            others = f"; {len(with_field)} other file(s) of {source.where} have it: files of one corpus must share their schema" if with_field else ""
            raise CorpusError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}){others}")
        dtype = schema.field(field).type
        if not _is_text(dtype):
            raise CorpusError(f"{path}: column {field!r} holds {dtype}, not text")


def batch_rows(group, column: int) -> int:
    """Rows per batch: BATCH_ROWS, fewer where the row group's texts are long (about BATCH_BYTES a batch)."""
    size = group.column(column).total_uncompressed_size if column >= 0 else 0
    per_row = size / max(group.num_rows, 1)
    return max(1, min(BATCH_ROWS, int(BATCH_BYTES / per_row) if per_row else BATCH_ROWS))


def _values(batch, field: str) -> list:
    return batch.column(batch.schema.get_field_index(field)).to_pylist()


def _records(values: list, first_row: int, path: Path, stats: CorpusStats) -> Iterator[tuple[int, Record]]:
    for row, text in enumerate(values, first_row):
        if isinstance(text, str) and text.strip():
            yield row, Record(text=text)
        else:
            stats.skip("empty", f"{path} row {row}")


def stream_parquet(source: Source, field: str, stats: CorpusStats, start: Part) -> Iterator[tuple[Part, Record]]:
    """(part, record) for every text of a Parquet source from row group `start.pos` of file `start.file` on."""
    for fi in range(start.file, len(source.files)):
        path = source.files[fi]
        pf = parquet_file(path)
        first_group = start.pos if fi == start.file else 0
        row = sum(pf.metadata.row_group(g).num_rows for g in range(first_group))
        for g in range(first_group, pf.metadata.num_row_groups):
            part = Part(fi, g, 1)
            try:
                rows = batch_rows(pf.metadata.row_group(g), pf.schema_arrow.get_field_index(field))
                batches = pf.iter_batches(batch_size=rows, row_groups=[g], columns=[field], use_threads=False)
                for batch in batches:
                    values = _values(batch, field)
                    for _, record in _records(values, row, path, stats):
                        yield part, record
                    row += len(values)
            except CorpusError:
                raise
            except Exception as exc:  # a damaged page: name the file, lose nothing silently
                raise CorpusError(f"cannot read {path} (row group {g}) as Parquet: {exc}") from None


def stream_arrow(source: Source, field: str, stats: CorpusStats, start: Part) -> Iterator[tuple[Part, Record]]:
    """(part, record) for every text of an Arrow source from record batch `start.pos` of file `start.file` on."""
    for fi in range(start.file, len(source.files)):
        path = source.files[fi]
        first_batch = start.pos if fi == start.file else 0
        row = 0
        try:
            for b, batch in enumerate(_arrow_reader(path)):
                if b >= first_batch:
                    for _, record in _records(_values(batch, field), row, path, stats):
                        yield Part(fi, b, 1), record
                row += batch.num_rows
        except CorpusError:
            raise
        except Exception as exc:
            raise CorpusError(f"cannot read {path} as Arrow: {exc}") from None
