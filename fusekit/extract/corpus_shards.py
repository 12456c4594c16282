"""The corpus read for extraction: one pass that sizes, fingerprints and indexes it, then each shard's texts
read from their own part of the corpus.

The corpus is split by text into contiguous shards (`shard_slice`); the number of texts, and by default
their size, fix how many. The first pass is streamed (memory does not grow with the corpus) and saved in
the store folder as `.corpus-index.json`, keyed by each corpus file's path, size and modification time:
a later job of the same store (another `--shard I/N`, a resume) whose files are unchanged reads only its
own shards' parts (Parquet row groups, Arrow batches, 16 MiB stretches of a line file). A shard whose
part no longer holds the texts the index says is refused as a changed corpus.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fusekit.corpus import CorpusError, CorpusIndex, CorpusStats, RangeReader, Record, Source, open_source, scan
from fusekit.store.atomic import write_json_atomic
from fusekit.store.shards import CORPUS_INDEX as INDEX_FILE
from fusekit.store.shards import MAX_SHARDS, shard_slice

# A default shard holds about this many characters (~1M tokens): a killed run loses at most that much.
SHARD_CHARS = 4_000_000
_INDEX_FORMAT = "fusekit-corpus-index/1"


@dataclass
class CorpusInfo:
    """What one pass over the corpus found (the counts of skipped texts are in `stats`)."""

    n_texts: int  # texts kept (empty and non-UTF-8 ones skipped)
    chars: int  # their size in characters (chat records: their key's)
    fingerprint: str  # corpus_fingerprint of the texts as read
    stats: CorpusStats
    source: Source | None = None
    index: CorpusIndex | None = None
    from_cache: bool = False  # the index was read from the store folder, not from the corpus


def scan_corpus(data: str | Path, field: str, store: str | Path | None = None) -> CorpusInfo:
    """How many texts, how large, the fingerprint of the corpus as read, and where each part's texts
    start: from the index saved in STORE when the corpus files are unchanged, else one streaming pass."""
    source = open_source(data, field)
    identity = source.identity()
    index = _cached_index(Path(store), field, identity) if store is not None else None
    cached = index is not None
    if index is None:
        index = scan(source, field)
    if index.n_texts == 0:
        detail = f" ({index.stats.summary()})" if index.stats.skipped else ""
        raise CorpusError(f"no texts in {data}{detail}")
    return CorpusInfo(index.n_texts, index.chars, index.fingerprint, index.stats, source, index, cached)


def save_index(store: Path, info: CorpusInfo, field: str) -> None:
    """Keep the scan in STORE for later jobs (once: a cached one is already there)."""
    if info.from_cache or info.index is None or info.source is None:
        return
    obj = {"format": _INDEX_FORMAT, "field": field, "files": info.source.identity(), **info.index.as_json()}
    write_json_atomic(obj, store / INDEX_FILE)


def _cached_index(store: Path, field: str, identity: list[list]) -> CorpusIndex | None:
    path = store / INDEX_FILE
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") != _INDEX_FORMAT or obj.get("field") != field or obj.get("files") != identity:
            return None
        return CorpusIndex.from_json(obj)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or unreadable: scan again


def default_num_shards(info: CorpusInfo) -> int:
    """About SHARD_CHARS characters per shard, at least one text each, at most MAX_SHARDS."""
    return max(1, min(info.n_texts, MAX_SHARDS, math.ceil(info.chars / SHARD_CHARS)))


def records_by_shard(info: CorpusInfo, field: str, num_shards: int, wanted: list[int]) -> Iterator[tuple[int, list[Record]]]:
    """(shard index, its records) for the wanted shards, each read from its own part of the corpus on
    (consecutive shards in one stream)."""
    assert info.source is not None and info.index is not None
    reader = RangeReader(info.source, field, info.index)
    for i in sorted(wanted):
        r = shard_slice(info.n_texts, i, num_shards)
        records = list(reader.read(r.start, r.stop))
        if len(records) != len(r):
            raise CorpusError(f"{info.source.where} changed while extracting (fewer texts than the first read found); re-run")
        yield i, records
