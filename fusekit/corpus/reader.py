"""Reading a corpus as a stream: all its records in order (`read_records`), one pass that indexes where
each part's texts start (`scan`), and the records of a range of text ids read from their own parts only
(`read_range`).

Memory holds one line, one text file or one record batch at a time, whatever the corpus size. A text's id
is its position among the records kept (empty and non-UTF-8 texts are skipped and counted), exactly as
a whole-file read numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Iterator

from fusekit.corpus.columnar import check_columns, stream_arrow, stream_parquet
from fusekit.corpus.lines import stream_files, stream_lines
from fusekit.corpus.parts import START, Part
from fusekit.corpus.records import CorpusStats, Record, corpus_fingerprint, record_key
from fusekit.corpus.sources import Source, resolve_source


def open_source(data: str | Path | Source, field: str = "text") -> Source:
    """DATA resolved, and for columnar formats every file's schema checked (CorpusError otherwise)."""
    source = data if isinstance(data, Source) else resolve_source(data)
    if source.kind in ("parquet", "arrow"):
        check_columns(source, field)
    return source


def stream(source: Source, field: str, stats: CorpusStats, start: Part = START) -> Iterator[tuple[Part, Record]]:
    """(part, record) for every record from part `start` to the end of the corpus."""
    if source.kind in ("lines", "jsonl"):
        return stream_lines(source, field, stats, start)
    if source.kind == "files":
        return stream_files(source, stats, start)
    if source.kind == "parquet":
        return stream_parquet(source, field, stats, start)
    return stream_arrow(source, field, stats, start)


def read_records(data: str | Path | Source, field: str = "text", stats: CorpusStats | None = None) -> Iterator[Record]:
    """The corpus's records in order, streamed. Empty and non-UTF-8 texts are skipped and counted in `stats`."""
    stats = stats if stats is not None else CorpusStats()
    source = open_source(data, field)
    for _, record in stream(source, field, stats):
        stats.texts += 1
        yield record


@dataclass
class CorpusIndex:
    """What one pass over a corpus found: its size, fingerprint, and the first text id of every part.

    `parts[i]` starts at text id `firsts[i]`; a part with no kept text is not listed. Saved as JSON
    (`as_json` / `from_json`) beside a store so later jobs need not read the whole corpus again.
    """

    n_texts: int
    chars: int  # the texts' size in characters (chat records: their key's)
    fingerprint: str  # corpus_fingerprint of the records as read
    stats: CorpusStats
    parts: list[Part] = dc_field(default_factory=list)
    firsts: list[int] = dc_field(default_factory=list)

    def as_json(self) -> dict:
        s = self.stats
        return {
            "n_texts": self.n_texts, "chars": self.chars, "fingerprint": self.fingerprint,
            "stats": {"texts": s.texts, "empty": s.empty, "non_utf8": s.non_utf8, "examples": s.examples},
            "parts": [[*p, f] for p, f in zip(self.parts, self.firsts)],
        }

    @classmethod
    def from_json(cls, obj: dict) -> CorpusIndex:
        return cls(
            obj["n_texts"], obj["chars"], obj["fingerprint"], CorpusStats(**obj["stats"]),
            [Part(*row[:3]) for row in obj["parts"]], [row[3] for row in obj["parts"]],
        )

    def start_of(self, text_id: int) -> tuple[Part, int]:
        """The part holding `text_id`, and its first text id."""
        import bisect

        i = bisect.bisect_right(self.firsts, text_id) - 1
        return self.parts[i], self.firsts[i]


def scan(source: Source, field: str) -> CorpusIndex:
    """One streaming pass: how many texts, how large, the fingerprint, and where each part's texts start."""
    stats = CorpusStats()
    index = CorpusIndex(0, 0, "", stats)

    def counted() -> Iterator[Record]:
        last = None
        for part, record in stream(source, field, stats):
            if part != last:
                index.parts.append(part)
                index.firsts.append(stats.texts)
                last = part
            stats.texts += 1
            index.chars += len(record.text) if record.text is not None else len(record_key(record))
            yield record

    index.fingerprint = corpus_fingerprint(counted())
    index.n_texts = stats.texts
    return index


class RangeReader:
    """Records by text id range, each range read from the part holding its start; a range that starts
    where the last one stopped (or later in the same part) continues the open stream instead."""

    def __init__(self, source: Source, field: str, index: CorpusIndex):
        self.source, self.field, self.index = source, field, index
        self._records: Iterator[Record] | None = None
        self._pos = 0  # text id of the next record of the open stream

    def read(self, start: int, stop: int) -> Iterator[Record]:
        """The records with text ids start..stop-1 (fewer if the corpus ends first)."""
        if start >= stop:
            return
        part, first = self.index.start_of(start)
        if self._records is None or not first <= self._pos <= start:
            self._records = (r for _, r in stream(self.source, self.field, CorpusStats(), part))
            self._pos = first
        for record in self._records:
            self._pos += 1
            if self._pos > start:
                yield record
            if self._pos >= stop:
                return
        self._records = None


def read_range(source: Source, field: str, index: CorpusIndex, start: int, stop: int) -> Iterator[Record]:
    """The records with text ids start..stop-1, read from the part holding `start` on (nothing before it)."""
    return RangeReader(source, field, index).read(start, stop)
