"""FuseChat's statistical map for a pair of extraction stores: the DTW counts over their corpus, counted
in parts and shared through a locked cache entry (one count pass per tokenizer pair and corpus, whichever
of a store's shard jobs gets there first), then the map (`statmap.statistical_vocab_map`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from fusekit.align.inputs import ExtractedText, info_of, joined_texts
from fusekit.align.statmap import COUNTS_FORMAT, AlignmentCounts, count_alignments, statistical_vocab_map
from fusekit.align.tokens import TokenTable, VocabMapStats
from fusekit.align.vocab_cache import VocabMap, exact_map, pair_digest
from fusekit.store.atomic import write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.store.lock import ShardLock
from fusekit.store.shards import settings_digest, shard_slice


def _window_pairs(target, source, parts: Iterable[range] | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(source ids, target ids) per target window, as the `fusellm` store path aligns them: the source
    tokens whose start offset lies in the window's character span. Reads the texts of `parts` (ranges of
    text ids; default: the target's shards, `count_parts`) in turn."""
    for texts in count_parts(target) if parts is None else parts:
        for _, windows, (src_windows,) in joined_texts(target, [source], texts):  # text by text: memory stays small
            src = ExtractedText.of(src_windows, int(source.k))
            for w in windows:
                yield src.ids[src.span(int(w.char_start), int(w.char_end))], np.asarray(w.input_ids, np.int64)


def count_parts(target) -> list[range]:
    """The parts of the count pass: the text ids of each of the target store's shards."""
    n_shards = int(getattr(target, "num_shards", None) or target.settings.get("num_shards") or 1)
    return [shard_slice(int(target.n_texts), shard, n_shards) for shard in range(n_shards)]


# ---------------------------------------------------------------------------------------------- the map


def _corpus_identity(target, source) -> dict:
    return {
        "corpus_fingerprint": target.corpus_fingerprint,
        "n_texts": int(target.n_texts),
        "target_extract": settings_digest(target.settings),
        "source_extract": settings_digest(source.settings),
    }


def counts_cache_key(target, source) -> str:
    spec = [COUNTS_FORMAT, source.tokenizer_fingerprint, target.tokenizer_fingerprint, len(source.vocab), len(target.vocab), _corpus_identity(target, source)]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _read_counts(path: Path, pair: str, shape: tuple[int, int], meta_wanted: dict) -> AlignmentCounts | None:
    """The counts at `path` when it holds this pair's, with these meta entries; None otherwise."""
    if not path.is_file():
        return None
    try:
        counts, meta = AlignmentCounts.from_file(path)
    except ValueError:
        return None  # unreadable or another pair's: rebuilt by the caller
    if counts.pair != pair or counts.shape != shape or any(meta.get(k) != v for k, v in meta_wanted.items()):
        return None
    return counts


def _write_counts(counts: AlignmentCounts, meta: dict, path: Path) -> None:
    """Best effort: a read-only or vanished folder only costs a rebuild next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(counts.to_bytes(meta), path)
    except (OSError, StoreError):
        pass


def corpus_counts(
    target, source, cache_dir: Path, threads: int | None = None, shared: Path | None = None, start: float = 0.0
) -> tuple[AlignmentCounts, bool]:
    """(counts of `source` against `target` over their corpus, found already counted?).

    Stores are extraction stores of one corpus. The counts are found, in this order, as
    `<shared>/<key>.counts.npz`, as `<cache_dir>/<key>.counts.npz` (the vocabulary-map cache), else
    counted. The key names both tokenizers' fingerprints, vocabulary sizes and the corpus (fingerprint,
    number of texts, both stores' extraction settings); a file that does not hold this pair's vocabularies
    and corpus is rebuilt. The result is written to both places.

    `shared`: a folder every job aligning this corpus sees (`fusekit align` passes the aligned store's
    `fusechat-counts/`). Counting there is split into parts, one per target shard (`count_parts`), each
    counted by whichever job takes its lock first and published as `<key>.part-IIIII-of-NNNNN.counts.npz`;
    a job counts the parts nobody has taken, from the share `start` of them on (its own shard's place, so
    that concurrent jobs begin on different parts), then waits for those others are
    counting. Concurrent `--shard I/N` jobs thus share the pass and each part is counted once; jobs that
    run one after another read it; a job that dies drops its lock (`ShardLock`), so another counts its part.
    Counts are exact integer sums, so the total is the same however the parts were counted.
    """
    s_info, t_info = info_of(source), info_of(target)
    pair, identity = pair_digest(s_info, t_info), _corpus_identity(target, source)
    shape = (len(s_info), len(t_info))
    name = f"{counts_cache_key(target, source)}.counts.npz"
    places = ([Path(shared) / name] if shared is not None else []) + [Path(cache_dir) / name]
    for i, path in enumerate(places):
        counts = _read_counts(path, pair, shape, {"corpus": identity})
        if counts is not None:
            for other in places[:i] + places[i + 1 :]:  # the store's jobs and this machine's later runs find it too
                if _read_counts(other, pair, shape, {"corpus": identity}) is None:
                    _write_counts(counts, {"corpus": identity}, other)
            return counts, True
    tables = TokenTable(list(source.vocab)), TokenTable(list(target.vocab))
    if shared is None:
        counts = count_alignments(*tables, _window_pairs(target, source), shape, pair, threads)
    else:
        counts = _count_shared(target, source, tables, Path(shared), name[: -len(".counts.npz")], shape, pair, identity, threads, start)
    for path in places:
        _write_counts(counts, {"corpus": identity}, path)
    return counts, False


def _count_shared(
    target, source, tables, folder: Path, key: str, shape, pair: str, identity: dict, threads: int | None, start: float, poll: float = 0.5
) -> AlignmentCounts:
    """The count pass split into parts under locks in `folder` (see `corpus_counts`)."""
    parts = count_parts(target)
    n = len(parts)
    names = [f"{key}.part-{i:05d}-of-{n:05d}.counts.npz" for i in range(n)]
    metas = [{"corpus": identity, "part": [i, n], "texts": [r.start, r.stop]} for i, r in enumerate(parts)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {folder} for the fusechat alignment counts: {exc.strerror or exc}") from None
    got: dict[int, AlignmentCounts] = {}
    first = min(n - 1, max(0, int(start * n))) if n else 0
    order = [(first + j) % n for j in range(n)]
    while len(got) < n:
        progressed = False
        for i in order:
            if i in got:
                continue
            counts = _read_counts(folder / names[i], pair, shape, metas[i])
            if counts is None:
                lock = ShardLock(folder, names[i])
                if not lock.acquire():
                    continue  # another job is counting this part
                try:
                    counts = _read_counts(folder / names[i], pair, shape, metas[i])  # published meanwhile?
                    if counts is None:
                        counts = count_alignments(*tables, _window_pairs(target, source, [parts[i]]), shape, pair, threads)
                        write_bytes_atomic(counts.to_bytes(metas[i]), folder / names[i])
                finally:
                    lock.release()
            got[i] = counts
            progressed = True
        if len(got) < n and not progressed:
            time.sleep(poll)
    return AlignmentCounts.summed([got[i] for i in range(n)]) if n else AlignmentCounts.empty(shape, pair)


def statistical_map(
    target, source, fallback: VocabMap, cache_dir: Path, threads: int | None = None, shared: Path | None = None, start: float = 0.0
) -> VocabMap:
    """The `fusechat` `VocabMap` of a source store onto the target store (counts found or counted now,
    `corpus_counts`; `fallback` is the pair's FuseLLM map). Its report entry adds the counts' size and the
    share of the source vocabulary mapped from them."""
    counts, _ = corpus_counts(target, source, cache_dir, threads, shared, start)
    s_info, t_info = info_of(source), info_of(target)
    identical = exact_map(s_info, t_info).ids
    ids, seen = statistical_vocab_map(counts, s_info, t_info, fallback.ids, identical)
    exact = (ids >= 0) & (ids == identical)
    usable = int(s_info.usable.sum())
    detail = {
        "statistical": int(seen.sum()),
        "statistical_share": float(seen.sum()) / usable if usable else 0.0,
        "count_pairs": counts.nnz,
        "counted": counts.total,
    }
    return VocabMap(
        ids=ids,
        exact=exact,
        stats=VocabMapStats(exact=int(exact.sum()), min_ed=usable - int(exact.sum())),
        key=f"{fallback.key}+{counts_cache_key(target, source)}",
        detail=detail,
    )
