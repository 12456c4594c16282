"""One shard of `fusekit align`: the texts of shard I of N aligned and encoded as a Parquet file.

Shards split the corpus by text id, like extraction; each shard's result is a pure function of the
inputs (`ShardJob`), so a resumed, a sharded (`--shard I/N`) or a Ray run writes byte-identical files.
`align_shard` only computes (a Ray task runs it and returns the bytes); `write_shard` publishes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fusekit.align.bytespan import WholeText, transfer_whole_texts
from fusekit.align.candidates import SourceStats, target_candidate
from fusekit.align.carry import PendingWindow, carry_candidates
from fusekit.align.inputs import ExtractedText, StoreRef, info_of, open_extract
from fusekit.align.tokens import TokenTable
from fusekit.align.transfer import Method, Transferer
from fusekit.align.vocab_cache import VocabMap
from fusekit.store.aligned_store import encode_shard, shard_metadata, windows_frame
from fusekit.store.atomic import write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.store.shards import record_shard, shard_filename, shard_slice
from fusekit.store.types import AlignedWindow, Window
from fusekit.vocab.info import VocabInfo


@dataclass
class ShardJob:
    """Everything a shard needs, picklable (a Ray task receives it)."""

    target: StoreRef
    sources: list[StoreRef]
    vmaps: list[VocabMap]
    settings: dict
    workers: int | None


@dataclass
class ShardResult:
    """One shard aligned, not yet written (a Ray task returns it to the driver)."""

    index: int
    data: bytes  # the shard's Parquet file
    info: dict  # its sidecar (deterministic)
    seconds: float
    source_seconds: list[float] = field(default_factory=list)


def _texts_by_id(store, texts: range, role: str) -> dict[int, list[Window]]:
    out: dict[int, list[Window]] = {}
    for text_id, windows in store.iter_texts(texts):
        if text_id not in texts:
            raise StoreError(f"the {role} store returned text {text_id} outside the requested texts {texts.start}..{texts.stop - 1}")
        out[int(text_id)] = list(windows)
    return out


@dataclass
class SourceSide:
    """What aligning one source needs besides its windows: its k, vocabulary description and method;
    `vocab` and `vmap` for the 1:1 carry (`fusellm`, `fusechat`); `transferer` for `bytespan` (None: built
    here, with `workers` threads)."""

    k: int
    info: VocabInfo
    method: Method
    vocab: list[str] | None = None
    vmap: VocabMap | None = None
    transferer: Transferer | None = None


def align_texts(
    texts: Sequence[int],
    tgt_texts: dict[int, list[Window]],
    src_texts: Sequence[dict[int, list[Window]]],
    target_k: int,
    sources: Sequence[SourceSide],
    target_info: VocabInfo,
    target_vocab: list[str] | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    recall: bool = True,
) -> tuple[list[AlignedWindow], list[tuple[int, int]], list[SourceStats], list[float]]:
    """The aligned windows of `texts` (text ids, in order) from each model's extracted windows by text id:
    (windows, their (char_start, char_end) spans, per-source counts, per-source seconds).

    Candidate [0] is the target's own, then one per source by its method. The one code path of
    `fusekit align` (windows decoded from stores) and of online distillation (windows computed in memory).
    `target_vocab` is needed by the 1:1 carry only; `recall=False` skips the perfect-source check (report
    figures) of the byte-span transfer.
    """
    methods = [s.method for s in sources]
    out: list[AlignedWindow] = []
    spans: list[tuple[int, int]] = []
    # Per source, what its method works on: target windows (the 1:1 carry) or whole texts (bytespan).
    pending: list[list[PendingWindow]] = [[] for _ in sources]
    whole: list[list[WholeText]] = [[] for _ in sources]
    for text_id in texts:
        windows = tgt_texts.get(text_id, [])
        if not windows:
            continue
        per_source = [ExtractedText.of(st.get(text_id, []), s.k) for st, s in zip(src_texts, sources)]
        first = len(out)
        for w in windows:
            slot = len(out)
            tgt_ids = np.asarray(w.input_ids, dtype=np.int64)
            mask = None if w.loss_mask is None else np.asarray(w.loss_mask, dtype=bool)
            out.append(AlignedWindow(text_id=int(text_id), window=int(w.window), input_ids=tgt_ids, candidates=[target_candidate(w)], loss_mask=mask))
            spans.append((int(w.char_start), int(w.char_end)))
            for s_i, tt in enumerate(per_source):
                if methods[s_i] is not Method.BYTESPAN:
                    pending[s_i].append(PendingWindow(slot, tgt_ids, tt, tt.span(int(w.char_start), int(w.char_end))))
        tgt_tt = ExtractedText.of(windows, target_k)
        for s_i, tt in enumerate(per_source):
            if methods[s_i] is Method.BYTESPAN:
                whole[s_i].append(WholeText(int(text_id), first, [len(w.input_ids) for w in windows], tgt_tt, tt))

    # DTW tables of the 1:1 carry (the byte-span transfer builds its own in the Transferer).
    src_tables = [None if s.method is Method.BYTESPAN else TokenTable(s.vocab) for s in sources]
    tgt_table = TokenTable(target_vocab) if any(t is not None for t in src_tables) else None
    stats = [SourceStats() for _ in sources]
    source_seconds = []
    # Progress in (target token, source) pairs aligned.
    work, done = sum(len(w.input_ids) for w in out) * len(sources), 0

    def advance(tokens: int) -> None:
        nonlocal done
        done += tokens
        if on_progress is not None:
            on_progress(done, work)

    for s_i, source in enumerate(sources):
        t_src = time.perf_counter()
        if source.method is Method.BYTESPAN:
            transferer = source.transferer or Transferer(source.info, target_info, Method.BYTESPAN, threads=workers)
            transfer_whole_texts(whole[s_i], transferer, out, target_info, stats[s_i], advance, recall=recall)
        else:
            items = pending[s_i]
            one_to_one = source.method is Method.FUSECHAT
            cands = carry_candidates(items, src_tables[s_i], tgt_table, source.vmap, stats[s_i], target_info, one_to_one, workers, advance)
            for p, cand in zip(items, cands):
                out[p.slot].candidates.append(cand)
        source_seconds.append(time.perf_counter() - t_src)
    return out, spans, stats, source_seconds


def align_shard(job: ShardJob, index: int, on_progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """Align the texts of shard `index` and encode its Parquet file (nothing is written here).

    `on_progress(done, total)`: (target token, source) pairs aligned so far, of all in the shard."""
    t0 = time.perf_counter()
    settings = job.settings
    count = int(settings["num_shards"])
    texts = shard_slice(int(settings["n_texts"]), index, count)
    target = open_extract(job.target, "target", job.workers)
    sources = [open_extract(ref, f"source {i + 1}", job.workers) for i, ref in enumerate(job.sources)]
    tgt_texts = _texts_by_id(target, texts, "target")
    src_texts = [_texts_by_id(s, texts, f"source {i + 1}") for i, s in enumerate(sources)]

    methods = [Method(m) for m in settings.get("methods", [Method.FUSELLM.value] * len(sources))]
    sides = [
        SourceSide(int(s.k), info_of(s), m, list(s.vocab) if m is not Method.BYTESPAN else None, vmap)
        for s, m, vmap in zip(sources, methods, job.vmaps)
    ]
    out, spans, stats, source_seconds = align_texts(
        texts, tgt_texts, src_texts, int(target.k), sides, info_of(target), list(target.vocab), job.workers, on_progress
    )
    df = windows_frame(out, settings["ks"], spans)
    data = encode_shard(df, int(settings["row_group_rows"]), shard_metadata(settings))
    info = {
        "rows": len(out),
        "tokens": int(sum(len(w.input_ids) for w in out)),
        "texts": [texts.start, texts.stop],
        "sources": [s.as_json() for s in stats],
    }
    return ShardResult(index=index, data=data, info=info, seconds=time.perf_counter() - t0, source_seconds=source_seconds)


def write_shard(out: Path, count: int, result: ShardResult) -> None:
    """Publish the shard, then its sidecar (the order that makes a kill at any moment safe)."""
    name = shard_filename(result.index, count)
    write_bytes_atomic(result.data, out / name)
    info = dict(result.info, sha256=hashlib.sha256(result.data).hexdigest())
    record_shard(out, name, info)
