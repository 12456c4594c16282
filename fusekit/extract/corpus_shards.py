"""The corpus read for extraction: one pass that sizes and fingerprints it, then its texts shard by shard.

The corpus is split by text into contiguous shards (`shard_slice`); the number of texts, and by
default their size, fix how many. A shard's records are read again in a later streaming pass, which
refuses a corpus that changed in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fusekit.corpus import CorpusError, CorpusStats, Record, corpus_fingerprint, read_records, record_key
from fusekit.store.shards import MAX_SHARDS, shard_slice

# A default shard holds about this many characters (~1M tokens): a killed run loses at most that much.
SHARD_CHARS = 4_000_000


@dataclass
class CorpusInfo:
    """What one pass over the corpus found (the counts of skipped texts are in `stats`)."""

    n_texts: int  # texts kept (empty and non-UTF-8 ones skipped)
    chars: int  # their size in characters (chat records: their key's)
    fingerprint: str  # corpus_fingerprint of the texts as read
    stats: CorpusStats


def scan_corpus(data: str | Path, field: str) -> CorpusInfo:
    """One streaming pass: how many texts, how large, and the fingerprint of the corpus as read."""
    stats = CorpusStats()
    chars = 0

    def counted() -> Iterator[Record]:
        nonlocal chars
        for record in read_records(data, field, stats):
            chars += len(record.text) if record.text is not None else len(record_key(record))
            yield record

    fingerprint = corpus_fingerprint(counted())
    if stats.texts == 0:
        detail = f" ({stats.summary()})" if stats.skipped else ""
        raise CorpusError(f"no texts in {data}{detail}")
    return CorpusInfo(stats.texts, chars, fingerprint, stats)


def default_num_shards(info: CorpusInfo) -> int:
    """About SHARD_CHARS characters per shard, at least one text each, at most MAX_SHARDS."""
    return max(1, min(info.n_texts, MAX_SHARDS, math.ceil(info.chars / SHARD_CHARS)))


def records_by_shard(data, field: str, n_texts: int, num_shards: int, wanted: list[int]) -> Iterator[tuple[int, list[Record]]]:
    """(shard index, its records) for the wanted shards, in one streaming pass over the corpus."""
    todo = sorted(wanted)
    if not todo:
        return
    ranges = {i: shard_slice(n_texts, i, num_shards) for i in todo}
    pos = 0
    current: list[Record] = []
    records = read_records(data, field)
    for i in todo:
        r = ranges[i]
        current = []
        for record in records:
            if pos >= r.start:
                current.append(record)
            pos += 1
            if pos >= r.stop:
                break
        if len(current) != len(r):
            raise CorpusError(f"{data} changed while extracting (fewer texts than the first read found); re-run")
        yield i, current
