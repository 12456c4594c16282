"""One shard of `fusekit align`: the texts of shard I of N aligned and written as a Parquet file.

Shards split the corpus by text id, like extraction; each shard's result is a pure function of the
inputs (`ShardJob`), so a resumed, a sharded (`--shard I/N`) or a Ray run writes byte-identical files.

A shard is aligned in batches of whole texts holding at least one row group of windows
(`settings.row_group_rows`): the extraction stores are read text by text as the batches need them, and
the windows go to the Parquet writer a row group at a time as soon as they are aligned
(`aligned_format.stream_shard`), so a shard job holds about one row group of windows and one batch of
texts, whatever the shard's size. Every text is aligned on its own, each row group is built from its own
windows, and the counts of the report add up in text order, so the file and its sidecar do not depend on
where the batches are cut. `align_shard_to` writes a shard's file; `align_shard` returns its bytes (a
Ray task, whose driver publishes them with `write_shard`).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import polars as pl

from fusekit._prefetch import prefetched
from fusekit.align.bytespan import WholeText, transfer_whole_texts
from fusekit.align.candidates import SourceStats, target_candidates
from fusekit.align.carry import PendingWindow, carry_candidates
from fusekit.align.inputs import ExtractedText, JoinedText, StoreRef, info_of, joined_texts, open_extract
from fusekit.align.tokens import TokenTable
from fusekit.align.transfer import Method, Transferer
from fusekit.align.vocab_cache import VocabMap
from fusekit.store.aligned_format import has_mass, shard_metadata, stream_shard, windows_frame
from fusekit.store.atomic import atomic_file, write_bytes_atomic
from fusekit.store.shards import record_shard, sha256_file, shard_filename, shard_slice
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
    """One shard aligned: its sidecar and timings, and (from `align_shard`, for a Ray driver) its bytes."""

    index: int
    info: dict  # its sidecar (deterministic)
    seconds: float
    source_seconds: list[float] = field(default_factory=list)
    data: bytes | None = None  # the shard's Parquet file, when it was not written in place


def text_batches(texts: Iterator[JoinedText], rows: int) -> Iterator[list[JoinedText]]:
    """Consecutive whole texts, each batch holding at least `rows` target windows (the last may hold fewer)."""
    batch: list[JoinedText] = []
    held = 0
    for item in texts:
        batch.append(item)
        held += len(item[1])
        if held >= rows:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


@dataclass
class SourceSide:
    """What aligning one source needs besides its windows: its k, vocabulary description and method;
    `table` (its DTW token table) and `vmap` for the 1:1 carry (`fusellm`, `fusechat`); `transferer`
    for `bytespan`."""

    k: int
    info: VocabInfo
    method: Method
    table: TokenTable | None = None
    vmap: VocabMap | None = None
    transferer: Transferer | None = None


class ShardContext:
    """What every shard of a job shares, prepared once per process: the opened stores, each source's
    method, the DTW tables of the 1:1 carry and the byte-span transfer's vocabulary pairs (with large
    vocabularies, seconds of work that a serial run should not repeat per shard)."""

    def __init__(self, job: ShardJob):
        self.job = job
        self.target = open_extract(job.target, "target", job.workers)
        self.sources = [open_extract(ref, f"source {i + 1}", job.workers) for i, ref in enumerate(job.sources)]
        methods = [Method(m) for m in job.settings.get("methods", [Method.FUSELLM.value] * len(self.sources))]
        self.target_info = info_of(self.target)
        carry = any(m is not Method.BYTESPAN for m in methods)
        self.tgt_table = TokenTable(list(self.target.vocab)) if carry else None
        self.sides = [
            SourceSide(int(s.k), info_of(s), m, vmap=v, transferer=Transferer(info_of(s), self.target_info, Method.BYTESPAN, threads=job.workers))
            if m is Method.BYTESPAN
            else SourceSide(int(s.k), info_of(s), m, table=TokenTable(list(s.vocab)), vmap=v)
            for s, m, v in zip(self.sources, methods, job.vmaps)
        ]


class TextAligner:
    """Aligns batches of whole texts (each: its target windows and every source's windows of that text)
    with every source by its method, adding up each source's counts and seconds. The one code path of
    `fusekit align` (windows read from stores) and of online distillation (windows computed in memory)."""

    def __init__(
        self,
        target_k: int,
        sides: Sequence[SourceSide],
        target_info: VocabInfo,
        tgt_table: TokenTable | None = None,
        workers: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        recall: bool = True,
    ):
        self.target_k, self.sides, self.target_info, self.tgt_table = target_k, list(sides), target_info, tgt_table
        self.workers, self.on_progress, self.recall = workers, on_progress, recall
        self.stats = [SourceStats() for _ in self.sides]
        self.source_seconds = [0.0] * len(self.sides)
        self.rows = self.tokens = 0
        self.done = 0
        self.total = 0  # (target token, source) pairs of the batches seen so far

    def advance(self, tokens: int) -> None:
        self.done += tokens
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def align_batch(self, batch: list[JoinedText]) -> tuple[list[AlignedWindow], list[tuple[int, int]]]:
        """Align the texts of `batch` with every source: their windows with all candidates, and each
        window's (char_start, char_end)."""
        sides = self.sides
        out: list[AlignedWindow] = []
        spans: list[tuple[int, int]] = []
        # Per source, what its method works on: target windows (the 1:1 carry) or whole texts (bytespan).
        pending: list[list[PendingWindow]] = [[] for _ in sides]
        whole: list[list[WholeText]] = [[] for _ in sides]
        for text_id, windows, src_windows in batch:
            per_source = [ExtractedText.of(sw, side.k) for sw, side in zip(src_windows, sides)]
            first = len(out)
            for w, own in zip(windows, target_candidates(windows)):
                slot = len(out)
                tgt_ids = np.asarray(w.input_ids, dtype=np.int64)
                mask = None if w.loss_mask is None else np.asarray(w.loss_mask, dtype=bool)
                out.append(AlignedWindow(text_id=text_id, window=int(w.window), input_ids=tgt_ids, candidates=[own], loss_mask=mask))
                spans.append((int(w.char_start), int(w.char_end)))
                for s_i, tt in enumerate(per_source):
                    if sides[s_i].method is not Method.BYTESPAN:
                        pending[s_i].append(PendingWindow(slot, tgt_ids, tt, tt.span(int(w.char_start), int(w.char_end))))
            tgt_tt = ExtractedText.of(windows, self.target_k)
            for s_i, tt in enumerate(per_source):
                if sides[s_i].method is Method.BYTESPAN:
                    whole[s_i].append(WholeText(text_id, first, [len(w.input_ids) for w in windows], tgt_tt, tt))

        tokens = sum(len(w.input_ids) for w in out)
        self.total += tokens * len(sides)
        for s_i, side in enumerate(sides):
            t_src = time.perf_counter()
            if side.method is Method.BYTESPAN:
                transfer_whole_texts(whole[s_i], side.transferer, out, self.target_info, self.stats[s_i], self.advance, self.recall)
            else:
                items = pending[s_i]
                one_to_one = side.method is Method.FUSECHAT
                cands = carry_candidates(
                    items, side.table, self.tgt_table, side.vmap, self.stats[s_i], self.target_info, one_to_one, self.workers, self.advance
                )
                for p, cand in zip(items, cands):
                    out[p.slot].candidates.append(cand)
            self.source_seconds[s_i] += time.perf_counter() - t_src
        self.rows += len(out)
        self.tokens += tokens
        return out, spans


class _ShardAligner(TextAligner):
    """One shard's batches: the context's stores and tables, read text by text, a row group at a time."""

    def __init__(self, context: ShardContext, on_progress: Callable[[int, int], None] | None):
        super().__init__(int(context.target.k), context.sides, context.target_info, context.tgt_table, context.job.workers, on_progress)
        self.context, self.settings = context, context.job.settings

    def frames(self, texts: range, batch_rows: int | None = None, prefetch: bool = False) -> Iterator[pl.DataFrame]:
        """The shard's rows, one frame per row group, built from the windows of batches of whole texts
        holding at least `batch_rows` windows each (default: a row group's); `prefetch`: the next batch
        is read and decoded in another thread while this one is aligned."""
        rows = int(self.settings["row_group_rows"])
        mass = has_mass(self.settings.get("format_version"))
        held: list[AlignedWindow] = []
        spans: list[tuple[int, int]] = []
        batches = text_batches(joined_texts(self.context.target, self.context.sources, texts), batch_rows or rows)
        if prefetch:
            batches = prefetched(batches, name="fusekit-align-read")
        for batch in batches:
            out, out_spans = self.align_batch(batch)
            held += out
            spans += out_spans
            while len(held) >= rows:
                yield windows_frame(held[:rows], self.settings["ks"], spans[:rows], with_mass=mass)
                held, spans = held[rows:], spans[rows:]
        if held:
            yield windows_frame(held, self.settings["ks"], spans, with_mass=mass)



def align_texts(
    texts: Sequence[int],
    tgt_texts: dict[int, list[Window]],
    src_texts: Sequence[dict[int, list[Window]]],
    target_k: int,
    sides: Sequence[SourceSide],
    target_info: VocabInfo,
    tgt_table: TokenTable | None = None,
    workers: int | None = None,
    recall: bool = True,
) -> tuple[list[AlignedWindow], list[tuple[int, int]], list[SourceStats], list[float]]:
    """The aligned windows of `texts` (text ids, in order) from each model's windows by text id, computed
    in memory (online distillation): (windows, their (char_start, char_end), per-source counts, per-source
    seconds). Candidate [0] is the target's own, then one per source by its method; `tgt_table` is needed
    by the 1:1 carry only; `recall=False` skips the byte-span transfer's perfect-source check."""
    aligner = TextAligner(target_k, sides, target_info, tgt_table, workers, recall=recall)
    batch = [(int(t), tgt_texts[t], [st.get(t, []) for st in src_texts]) for t in texts if tgt_texts.get(t)]
    out, spans = aligner.align_batch(batch)
    return out, spans, aligner.stats, aligner.source_seconds


def align_shard_to(
    job: ShardJob,
    index: int,
    fh: BinaryIO,
    on_progress: Callable[[int, int], None] | None = None,
    context: ShardContext | None = None,
    batch_rows: int | None = None,
    prefetch: bool | None = None,
) -> ShardResult:
    """Align the texts of shard `index` and write its Parquet file into the open file `fh`, row group by
    row group. Returns the sidecar's contents but the file's sha256 (the caller has the file).

    `on_progress(done, total)`: (target token, source) pairs aligned so far, of those read so far.
    `context`: the job's `ShardContext` when several shards share one (prepared here otherwise).
    `batch_rows`: the fewest windows a batch of texts holds (default: a row group's); the file does not
    depend on it. `prefetch`: read, align and encode in three threads, a batch apart (default: when
    `job.workers` is not 1; worth it for a shard aligned alone, not for one of several at once)."""
    t0 = time.perf_counter()
    settings = job.settings
    texts = shard_slice(int(settings["n_texts"]), index, int(settings["num_shards"]))
    aligner = _ShardAligner(context or ShardContext(job), on_progress)
    schema = windows_frame([], settings["ks"], with_mass=has_mass(settings.get("format_version"))).schema
    prefetch = job.workers != 1 if prefetch is None else prefetch
    frames = aligner.frames(texts, batch_rows, prefetch)
    if prefetch:  # a row group is aligned while the previous one is encoded
        frames = prefetched(frames, name="fusekit-align")
    stream_shard(frames, schema, fh, int(settings["row_group_rows"]), shard_metadata(settings))
    info = {
        "rows": aligner.rows,
        "tokens": int(aligner.tokens),
        "texts": [texts.start, texts.stop],
        "sources": [s.as_json() for s in aligner.stats],
    }
    return ShardResult(index=index, info=info, seconds=time.perf_counter() - t0, source_seconds=aligner.source_seconds)


def align_shard(job: ShardJob, index: int, on_progress: Callable[[int, int], None] | None = None, batch_rows: int | None = None) -> ShardResult:
    """`align_shard_to` into a temporary file, returned as bytes in `ShardResult.data` (nothing is written
    where the store is: a Ray task runs this and its driver publishes the bytes with `write_shard`)."""
    with tempfile.TemporaryFile() as fh:
        result = align_shard_to(job, index, fh, on_progress, batch_rows=batch_rows)
        fh.seek(0)
        result.data = fh.read()
    return result


def write_shard(out: Path, count: int, result: ShardResult) -> None:
    """Publish the shard's bytes (`ShardResult.data`), then its sidecar (the order that makes a kill at
    any moment safe)."""
    if result.data is None:
        raise ValueError("this ShardResult holds no bytes: it was written in place (align_and_write_shard)")
    name = shard_filename(result.index, count)
    write_bytes_atomic(result.data, out / name)
    record_shard(out, name, dict(result.info, sha256=hashlib.sha256(result.data).hexdigest()))


def align_and_write_shard(
    job: ShardJob,
    index: int,
    out: Path,
    on_progress: Callable[[int, int], None] | None = None,
    context: ShardContext | None = None,
    prefetch: bool | None = None,
) -> ShardResult:
    """Align shard `index` straight into its file in the store `out` (through a temporary name, published
    when complete), then write its sidecar: a serial or `--shard I/N` run never holds the shard's bytes."""
    count = int(job.settings["num_shards"])
    name = shard_filename(index, count)
    with atomic_file(out / name) as fh:
        result = align_shard_to(job, index, fh, on_progress, context, prefetch=prefetch)
    record_shard(out, name, dict(result.info, sha256=sha256_file(out / name)))
    return result
