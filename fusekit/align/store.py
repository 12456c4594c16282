"""Stage 2 over stores: every source's top-k onto the target's tokens, written as an aligned store.

`align_store(target, sources, out)` reads extraction stores of one corpus (FUSION-METHOD.md §2–3):

* **Vocabulary map** source → target, built once per tokenizer pair and cached on disk
  (`vocab_cache.py`); for the `fusechat` method, FuseChat's statistical map counted over this corpus
  (`statmap.py`, cached per tokenizer pair and corpus).
* **Alignment on the text, not on windows.** Extraction tokenised each text once and cut the tokens into
  consecutive windows, so source and target windows cover different character spans. For each target
  window [char_start, char_end) the source tokens whose *start offset* lies in that span are gathered
  across the source's window boundaries, and DTW aligns them with the target window's tokens
  (normalised strings; all windows of a shard go through `align_ids_batch` on `workers` threads).
* **Edges.** A source token that starts inside the span but runs past `char_end` belongs to this
  window (it is aligned with the window's last target tokens); the target tokens of the next window
  that it overlaps are aligned with the next source tokens, so they usually fall back. A source token
  that starts before `char_start` is never in this window. A target window with no source token
  starting in its span (a source token covering the whole span, or text a source tokenizer dropped)
  is an *empty span*: every position falls back and the candidate's mean CE is NaN, which fusion
  reads as "never choose".
* **Carrying** (`align_topk`): a target position with exactly one aligned source position whose token
  maps to the target token takes the source's top-k at that position, ids mapped, renormalised (ids
  colliding after mapping are summed). Every other position falls back to one-hot on the *next*
  target token; the window's last position gets no entries (its next token is in the next window, and
  training never uses that position).
* **Candidates**, per target window: [0] the target's own top-k, renormalised over the kept k (softmax
  of the stored full-softmax log-probs), its per-token CE and the window's mean CE as extracted; then
  each source in order with CE at a carried position = the source's own CE at the aligned source
  position (−log p of *its* next token; NaN where it fell back, or where the source has no CE, i.e. at
  the end of a source window) and mean CE = the source's mean CE over the source tokens of the span
  (its metric on the same text, as the reference's per-sequence metric).

Shards split the corpus by text id, like extraction; each shard's result is a pure function of the
inputs, so a resumed, a sharded (`--shard I/N`) or a Ray run writes byte-identical files.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from fusekit.align.recall import perfect_source_topk, recalled, recalled_rows
from fusekit.align.remap import remap_spans
from fusekit.align.report import TIMINGS, SourceStats, build_report, print_report, split_timings
from fusekit.align.tokens import DTW_CHUNK, TokenTable, align_ids_batch, align_topk
from fusekit.align.transfer import DEFAULT_METHOD, Method, TextTokens, Transferer
from fusekit.align.vocab_cache import VocabMap, default_cache_dir, exact_map, vocab_map
from fusekit.progress import task_progress
from fusekit.store.aligned_store import (
    FORMAT,
    FORMAT_VERSION,
    REPORT,
    encode_shard,
    row_group_rows,
    shard_metadata,
    windows_frame,
)
from fusekit.store.atomic import clean_temporaries, write_bytes_atomic, write_json_atomic
from fusekit.store.errors import StoreError
from fusekit.store.shards import (
    complete_shards,
    open_store,
    parse_shard,
    read_manifest,
    record_shard,
    settings_digest,
    shard_filename,
    shard_is_complete,
    shard_slice,
)
from fusekit.store.types import AlignedWindow, Candidate, Window

if TYPE_CHECKING:  # pragma: no cover
    from fusekit.vocab.info import VocabInfo


StoreRef = Any  # a folder (str / Path) or an object with the ExtractStore interface


def open_extract(ref: StoreRef, role: str, threads: int | None = None):
    """An ExtractStore for a folder; objects with the interface are used as they are."""
    if isinstance(ref, (str, Path)):
        path = Path(ref)
        if not path.exists():
            raise StoreError(f"{role} store {path} does not exist: run `fusekit extract` for it first, or check the path")
        from fusekit.store.extract_store import ExtractStore

        return ExtractStore(path, threads=threads)
    return ref


def info_of(store) -> "VocabInfo":
    """The store's `VocabInfo` (objects with the ExtractStore interface but without one: guessed)."""
    info = getattr(store, "vocab_info", None)
    if info is None:
        from fusekit.vocab.info import VocabInfo

        info = VocabInfo.guess(list(store.vocab), getattr(store, "scheme", None))
        try:
            store.vocab_info = info
        except AttributeError:
            pass
    return info


def _describe(ref: StoreRef) -> str:
    return str(ref) if isinstance(ref, (str, Path)) else getattr(ref, "folder", type(ref).__name__)


def _identity(store) -> dict:
    """What the aligned store depends on from one extraction store (paths excluded: stores may move)."""
    s = store.settings
    return {
        "model": s.get("model"),
        "tokenizer_fingerprint": store.tokenizer_fingerprint,
        "scheme": str(getattr(store.scheme, "value", store.scheme)),
        "vocab_size": len(store.vocab),
        "k": int(store.k),
        "max_length": s.get("max_length"),
        "extract_settings_sha256": settings_digest(s),
    }


def check_stores(target, sources: Sequence, refs: Sequence[StoreRef]) -> None:
    """Refuse incomplete stores and stores of other corpora, naming the store and what to do."""
    if not sources:
        raise StoreError("give at least one --source store to align onto the target")
    for store, ref, role in zip([target, *sources], refs, ["target", *[f"source {i + 1}" for i in range(len(sources))]]):
        if not store.complete():
            raise StoreError(
                f"the {role} store {_describe(ref)} is incomplete (some shards are missing): finish "
                "`fusekit extract` for it (re-run it, or run the missing --shard I/N jobs) before aligning"
            )
    for i, (store, ref) in enumerate(zip(sources, refs[1:])):
        if store.corpus_fingerprint != target.corpus_fingerprint:
            raise StoreError(
                f"source {i + 1} ({_describe(ref)}) was extracted from another corpus than the target "
                f"({_describe(refs[0])}): corpus fingerprints {store.corpus_fingerprint[:12]}… vs "
                f"{target.corpus_fingerprint[:12]}…; extract every model from the same corpus (same file, field and limits)"
            )
        if store.n_texts != target.n_texts:
            raise StoreError(
                f"source {i + 1} ({_describe(ref)}) holds {store.n_texts} texts, the target {target.n_texts}: "
                "the stores' texts cannot be matched by text id; extract them again from the same corpus"
            )


# ---------------------------------------------------------------------------------------------- one text


@dataclass
class _TextTokens:
    """One source's tokens of one whole text (its windows concatenated)."""

    ids: np.ndarray  # int64 [m]
    offsets: np.ndarray  # int64 [m]
    topk_ids: np.ndarray  # int64 [m, k]
    topk_logp: np.ndarray  # float32 [m, k]
    ce: np.ndarray  # float32 [m]
    metric: np.ndarray  # bool [m]: positions counted in the mean CE (finite CE, next token is a loss token)
    ordered: bool
    text: str | None = None  # the whole text as this model saw it (None: a store without texts)

    @classmethod
    def of(cls, windows: Sequence[Window], k: int) -> "_TextTokens":
        if not windows:
            z = np.zeros(0, dtype=np.int64)
            return cls(z, z, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32), np.zeros(0, bool), True)
        ids = np.concatenate([np.asarray(w.input_ids, dtype=np.int64) for w in windows])
        offsets = np.concatenate([np.asarray(w.offsets, dtype=np.int64) for w in windows])
        ce = np.concatenate([np.asarray(w.ce, dtype=np.float32) for w in windows])
        metric = np.isfinite(ce)
        if any(w.loss_mask is not None for w in windows):
            mask = np.concatenate([np.asarray(w.loss_mask, dtype=bool) if w.loss_mask is not None else np.ones(len(w.input_ids), bool) for w in windows])
            # Position t predicts token t+1: it counts where t+1 is a loss token.
            metric[:-1] &= mask[1:]
        return cls(
            ids=ids,
            offsets=offsets,
            topk_ids=np.concatenate([np.asarray(w.topk_ids, dtype=np.int64) for w in windows]),
            topk_logp=np.concatenate([np.asarray(w.topk_logp, dtype=np.float32) for w in windows]),
            ce=ce,
            metric=metric,
            ordered=bool(np.all(np.diff(offsets) >= 0)),
            text=None if any(w.text is None for w in windows) else "".join(w.text for w in windows),
        )

    def perfect(self, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A perfect source's top-k over these tokens (perfect-source recall in the report), made once."""
        cached = getattr(self, "_perfect", None)
        if cached is None:
            cached = perfect_source_topk(self.ids, self.topk_ids.shape[1], vocab_size, seed)
            self._perfect = cached
        return cached

    def span(self, char_start: int, char_end: int) -> np.ndarray | slice:
        """Indices of the tokens whose start offset lies in [char_start, char_end)."""
        if self.ordered:
            lo = int(np.searchsorted(self.offsets, char_start, side="left"))
            hi = int(np.searchsorted(self.offsets, char_end, side="left"))
            return slice(lo, hi)
        return np.flatnonzero((self.offsets >= char_start) & (self.offsets < char_end))


def target_candidate(w: Window) -> Candidate:
    """The target's own candidate: its top-k renormalised over the kept k entries."""
    ids = np.asarray(w.topk_ids, dtype=np.int32)
    logp = np.asarray(w.topk_logp, dtype=np.float64)
    valid = (ids >= 0) & np.isfinite(logp)
    top = np.max(np.where(valid, logp, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.where(valid, np.exp(logp - top), 0.0)
    total = p.sum(axis=1, keepdims=True)
    probs = np.divide(p, total, out=np.zeros_like(p), where=total > 0).astype(np.float32)
    return Candidate(ids=np.where(valid, ids, -1).astype(np.int32), probs=probs, ce=np.asarray(w.ce, dtype=np.float32).copy(), mean_ce=float(w.mean_ce))


@dataclass
class _Pending:
    """One (target window, source) pair waiting for its DTW."""

    slot: int  # index of the target window in the shard's output
    tgt_ids: np.ndarray
    src: _TextTokens
    sel: np.ndarray | slice


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def source_candidate(p: _Pending, path: np.ndarray | None, vmap: VocabMap, stats: SourceStats, target_info=None, one_to_one: bool = False) -> Candidate:
    """Carry one source onto one target window (path None: the span holds no source token).
    `one_to_one`: carry only where the source position is aligned with that target position alone
    (the `fusechat` method, `align_topk`)."""
    tgt_ids = p.tgt_ids
    n = len(tgt_ids)
    k = p.src.topk_ids.shape[1]
    stats.windows += 1
    stats.positions += max(n - 1, 0)
    if path is None:
        stats.empty_windows += 1
        ids = np.full((n, k), -1, dtype=np.int32)
        probs = np.zeros((n, k), dtype=np.float32)
        ids[:-1, 0] = tgt_ids[1:]
        probs[:-1, 0] = 1.0
        return Candidate(ids=ids, probs=probs, ce=np.full(n, np.nan, dtype=np.float32), mean_ce=math.nan)
    s = p.src
    src_ids, topk_ids, topk_logp = s.ids[p.sel], s.topk_ids[p.sel], s.topk_logp[p.sel]
    out = align_topk(path, src_ids, tgt_ids, vmap.ids, topk_ids, topk_logp, one_to_one=one_to_one)
    carried = out.carried.copy()
    pos = out.src_pos
    ce_src = s.ce[p.sel]
    ce = np.where(carried, ce_src[np.maximum(pos, 0)], np.nan).astype(np.float32)
    counted = carried[:-1] if n else carried
    rows = pos[:-1][counted] if n else pos[:0]
    stats.carried += int(counted.sum())
    if rows.size:
        lp = topk_logp[rows].astype(np.float64)
        tid = topk_ids[rows]
        present = (tid >= 0) & np.isfinite(lp)
        mass = np.where(present, np.exp(np.where(present, lp, 0.0)), 0.0)
        exact = present & vmap.exact[np.where(tid >= 0, tid, 0)]
        stats.topk_mass += float(mass.sum())
        stats.kept_mass += float(np.where(exact, mass, 0.0).sum())
    if target_info is not None:
        bad = _bad_ids(target_info)
        live = out.ids[:-1][counted] if n else out.ids[:0]
        stats.bad_mass += float(np.where((live >= 0) & bad[np.maximum(live, 0)], out.probs[:-1][counted], 0.0).sum())
        pk_ids, pk_lp = s.perfect(len(vmap.ids), seed=0)
        chk = align_topk(path, src_ids, tgt_ids, vmap.ids, pk_ids[p.sel], pk_lp[p.sel], one_to_one=one_to_one)
        stats.recalled += int(recalled_rows(chk.ids, chk.probs, chk.carried, tgt_ids).sum())
    metric = s.metric[p.sel]
    return Candidate(ids=out.ids, probs=out.probs, ce=ce, mean_ce=_mean(ce_src[metric].astype(np.float64)))


TEXT_CHUNK = 64  # texts per transfer_batch call


@dataclass
class _WholeText:
    """One text for the byte-span transfer: the target's windows (from slot `first`) and the source."""

    text_id: int
    first: int
    lengths: list[int]
    target: _TextTokens
    source: _TextTokens


def _bad_ids(info) -> np.ndarray:
    """bool [V_t]: target ids that must get no mass (twins, specials other than the end tokens, empty ids)."""
    from fusekit.vocab.info import EMPTY, SPECIAL

    bad = info.twin | (info.kind == SPECIAL) | (info.kind == EMPTY)
    for end in (info.eos, info.eot):
        if end is not None:
            bad[end] = False
    return bad


def bytespan_candidates(chunk: Sequence[_WholeText], transferer: Transferer, out: list[AlignedWindow], target_info, stats: SourceStats) -> None:
    """Transfer each text of `chunk` as a whole and append the source's candidate to its target windows.

    A window's last row is left empty (its next token opens the next window; training never uses it).
    CE per row is the like-for-like CE (−ln of the source's probability of the target's next token);
    the window's mean CE averages it over the rows that carried and whose next token is a loss token.
    Also measures perfect-source recall on the same texts (report.json).
    """
    items, perfect = [], []
    for t in chunk:
        tt, st = t.target, t.source
        if tt.text is None or st.text is None:
            raise StoreError(
                "the byte-span transfer needs the texts, and these extraction stores were written without them "
                "(an older fusekit): re-run `fusekit extract`, or align with --method fusellm"
            )
        # Byte spans once per text: the real and the perfect-source transfer share them.
        tgt_tok = TextTokens(tt.ids, tt.offsets, transferer.spans(tt.text, TextTokens(tt.ids, tt.offsets), transferer.target.bytes))
        src_spans = transferer.source_spans(st.text, TextTokens(st.ids, st.offsets))
        if st.text != tt.text:  # chat: each model rendered its own template around the same messages
            src_spans = remap_spans(st.text.encode("utf-8", "surrogatepass"), tt.text.encode("utf-8", "surrogatepass"), src_spans)
        src_tok = TextTokens(st.ids, st.offsets, src_spans)
        items.append((tt.text, src_tok, tgt_tok, st.topk_ids, st.topk_logp, -st.ce))
        ids, lp = perfect_source_topk(st.ids, st.topk_ids.shape[1], len(transferer.source), seed=t.text_id)
        perfect.append((tt.text, src_tok, tgt_tok, ids, lp))
    k = max(1, chunk[0].source.topk_ids.shape[1]) if chunk else 1
    results = transferer.run(items, k)
    checks = transferer.run(perfect, k)
    bad = _bad_ids(target_info)
    for t, res, chk in zip(chunk, results, checks):
        st = t.source
        hits = recalled(chk, t.target.ids)
        lo = 0
        for w_i, n in enumerate(t.lengths):
            hi = lo + n
            window = out[t.first + w_i]
            ids, probs = res.ids[lo:hi].copy(), res.probs[lo:hi].copy()
            carried, ce = res.carried[lo:hi].copy(), res.ce[lo:hi].copy()
            if n:
                ids[-1], probs[-1], carried[-1], ce[-1] = -1, 0.0, False, np.nan
            pred = np.ones(max(n - 1, 0), bool)
            if window.loss_mask is not None and n:
                pred &= np.asarray(window.loss_mask, bool)[1:]
            # Rows whose true-token probability is unknown (a source window's last row, whose next token the
            # extraction could not score, when the true token is also outside the top-k) have no CE: left in,
            # one NaN would make the whole window's mean unknown and hand the window to the target (MinCE).
            used = carried[: max(n - 1, 0)] & pred & np.isfinite(ce[: max(n - 1, 0)])
            mean_ce = _mean(ce[: max(n - 1, 0)][used].astype(np.float64))
            window.candidates.append(Candidate(ids=ids, probs=probs, ce=ce, mean_ce=mean_ce))
            stats.windows += 1
            stats.positions += max(n - 1, 0)
            counted = carried[: max(n - 1, 0)]
            stats.carried += int(counted.sum())
            stats.recalled += int(hits[lo : lo + max(n - 1, 0)].sum())
            if not counted.any():
                stats.empty_windows += 1
            rows = res.source_row[lo : lo + max(n - 1, 0)][counted]
            if rows.size:
                lp = st.topk_logp[rows].astype(np.float64)
                present = (st.topk_ids[rows] >= 0) & np.isfinite(lp)
                stats.topk_mass += float(np.where(present, np.exp(np.where(present, lp, 0.0)), 0.0).sum())
            live = ids[: max(n - 1, 0)][counted]
            stats.bad_mass += float(np.where((live >= 0) & bad[np.maximum(live, 0)], probs[: max(n - 1, 0)][counted], 0.0).sum())
            lo = hi


# ---------------------------------------------------------------------------------------------- a shard


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


def align_shard(job: ShardJob, index: int, on_progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """Align the texts of shard `index` and encode its Parquet file (nothing is written here)."""
    t0 = time.perf_counter()
    settings = job.settings
    count = int(settings["num_shards"])
    texts = shard_slice(int(settings["n_texts"]), index, count)
    target = open_extract(job.target, "target", job.workers)
    sources = [open_extract(ref, f"source {i + 1}", job.workers) for i, ref in enumerate(job.sources)]
    tgt_texts = _texts_by_id(target, texts, "target")
    src_texts = [_texts_by_id(s, texts, f"source {i + 1}") for i, s in enumerate(sources)]

    methods = [Method(m) for m in settings.get("methods", [Method.FUSELLM.value] * len(sources))]
    out: list[AlignedWindow] = []
    spans: list[tuple[int, int]] = []
    pending: list[list[_Pending]] = [[] for _ in sources]
    whole: list[list[_WholeText]] = [[] for _ in sources]
    for text_id in texts:
        windows = tgt_texts.get(text_id, [])
        if not windows:
            continue
        per_source = [_TextTokens.of(st.get(text_id, []), int(s.k)) for st, s in zip(src_texts, sources)]
        first = len(out)
        for w in windows:
            slot = len(out)
            tgt_ids = np.asarray(w.input_ids, dtype=np.int64)
            mask = None if w.loss_mask is None else np.asarray(w.loss_mask, dtype=bool)
            out.append(AlignedWindow(text_id=int(text_id), window=int(w.window), input_ids=tgt_ids, candidates=[target_candidate(w)], loss_mask=mask))
            spans.append((int(w.char_start), int(w.char_end)))
            for s_i, tt in enumerate(per_source):
                if methods[s_i] is not Method.BYTESPAN:
                    pending[s_i].append(_Pending(slot, tgt_ids, tt, tt.span(int(w.char_start), int(w.char_end))))
        tgt_tt = _TextTokens.of(windows, int(target.k))
        for s_i, tt in enumerate(per_source):
            if methods[s_i] is Method.BYTESPAN:
                whole[s_i].append(_WholeText(int(text_id), first, [len(w.input_ids) for w in windows], tgt_tt, tt))

    src_tables = [TokenTable(list(s.vocab)) for s in sources]
    tgt_table = TokenTable(list(target.vocab))
    stats = [SourceStats() for _ in sources]
    source_seconds = []
    # Progress in (target token, source) pairs aligned.
    work, done = sum(len(w.input_ids) for w in out) * len(sources), 0
    for s_i, items in enumerate(pending):
        t_src = time.perf_counter()
        if methods[s_i] is Method.BYTESPAN:
            transferer = Transferer(info_of(sources[s_i]), info_of(target), Method.BYTESPAN, threads=job.workers)
            for lo in range(0, len(whole[s_i]), TEXT_CHUNK):
                chunk = whole[s_i][lo : lo + TEXT_CHUNK]
                bytespan_candidates(chunk, transferer, out, info_of(target), stats[s_i])
                done += sum(len(t.target.ids) for t in chunk)
                if on_progress is not None:
                    on_progress(done, work)
            source_seconds.append(time.perf_counter() - t_src)
            continue
        cands: list[Candidate | None] = [None] * len(items)
        for lo in range(0, len(items), DTW_CHUNK):
            chunk = items[lo : lo + DTW_CHUNK]
            live = [(n, p) for n, p in enumerate(chunk) if len(p.src.ids[p.sel]) and len(p.tgt_ids)]
            paths = align_ids_batch(src_tables[s_i], tgt_table, [(p.src.ids[p.sel], p.tgt_ids) for _, p in live], threads=job.workers)
            by_item: dict[int, np.ndarray] = {n: path for (n, _), path in zip(live, paths)}
            for n, p in enumerate(chunk):
                cands[lo + n] = source_candidate(p, by_item.get(n), job.vmaps[s_i], stats[s_i], info_of(target), methods[s_i] is Method.FUSECHAT)
            done += sum(len(p.tgt_ids) for p in chunk)
            if on_progress is not None:
                on_progress(done, work)
        for p, cand in zip(items, cands):
            out[p.slot].candidates.append(cand)
        source_seconds.append(time.perf_counter() - t_src)

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
    import hashlib

    name = shard_filename(result.index, count)
    write_bytes_atomic(result.data, out / name)
    info = dict(result.info, sha256=hashlib.sha256(result.data).hexdigest())
    record_shard(out, name, info)


# ---------------------------------------------------------------------------------------------- the stage


def _methods(method: str | Sequence[str] | None, n: int) -> list[Method]:
    names = [method] * n if method is None or isinstance(method, (str, Method)) else list(method)
    if len(names) != n:
        raise StoreError(f"{len(names)} alignment methods for {n} sources: give one, or one per source")
    known = {m.value for m in Method}
    unknown = sorted({str(m) for m in names if m is not None and str(getattr(m, "value", m)) not in known})
    if unknown:
        raise StoreError(f"unknown alignment method {', '.join(map(repr, unknown))}: choose from {', '.join(m.value for m in Method)}")
    return [Method(m) if m is not None else DEFAULT_METHOD for m in names]


def _source_map(target, source, method: Method, cache_dir: str | Path | None, workers: int | None) -> VocabMap:
    """The vocabulary map a source's method carries through: FuseLLM's (cached per tokenizer pair), the
    statistical one built on it (`fusechat`: counts cached per pair and corpus), or exact matches only
    (`bytespan`, for the report's counts)."""
    if method is Method.BYTESPAN:
        return exact_map(info_of(source), info_of(target))
    fixed = vocab_map(
        list(source.vocab), list(target.vocab), source.tokenizer_fingerprint, target.tokenizer_fingerprint, cache_dir, workers, info_of(source), info_of(target)
    )
    if method is Method.FUSELLM:
        return fixed
    from fusekit.align.statmap import statistical_map

    return statistical_map(target, source, fixed, Path(cache_dir) if cache_dir is not None else default_cache_dir(), workers)


def _num_shards(shard: str | None, num_shards: int | None, out: Path, target) -> tuple[int, list[int]]:
    """(N, the shards this run does): --shard I/N, else --shards, else the existing store's, else the target's."""
    if shard is not None:
        index, count = parse_shard(shard)
        if num_shards is not None and num_shards != count:
            raise StoreError(f"--shard {shard} names {count} shards but --shards says {num_shards}; give one of them")
        return count, [index]
    if num_shards is None:
        try:
            manifest = read_manifest(out)
            if manifest.get("format") == FORMAT:
                num_shards = int(manifest["settings"]["num_shards"])
        except (StoreError, KeyError, TypeError, ValueError):
            pass
    if num_shards is None:
        num_shards = int(target.settings.get("num_shards") or 1)
    if num_shards < 1:
        raise StoreError(f"the number of shards must be at least 1, got {num_shards}")
    return num_shards, list(range(num_shards))


def align_store(
    target: StoreRef,
    sources: Sequence[StoreRef] | StoreRef,
    out: str | Path,
    *,
    shard: str | None = None,
    num_shards: int | None = None,
    workers: int | None = None,
    vocab_map_cache: str | Path | None = None,
    ray: str | None = None,
    method: str | Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Align every source's top-k onto the target's tokens and write the aligned store OUT; returns the report.

    `target` and `sources` are extraction stores (folders, or objects with the ExtractStore interface) of
    the same corpus. `shard="I/N"` does only shard I of N (independent jobs fill one store with no
    coordinator); `num_shards` sets N for a whole run (default: the existing store's, else the target
    store's). `workers` is the number of DTW threads (default: all cores). `vocab_map_cache` is the
    folder of cached vocabulary maps (default `~/.cache/fusekit/vocab-maps`). `ray` ("auto" or an
    address) runs the shards as Ray tasks; the files are the same. Shards already complete are kept.
    `method`: how each source reaches the target's tokens — "bytespan" (default: the chain-rule transfer
    on byte spans, every position), "fusellm" (the paper's 1:1 carry) or "fusechat" (the 1:1 carry through
    FuseChat's statistical vocabulary map, counted over this corpus first and cached beside the vocabulary
    maps); one name for all sources or a list, one per source (`fusekit.align.transfer`, docs/ALIGN.md).
    """
    if isinstance(sources, (str, Path)) or not isinstance(sources, Iterable):
        sources = [sources]
    source_refs = list(sources)
    out = Path(out)
    if workers is not None and workers < 1:
        raise StoreError(f"--workers must be at least 1, got {workers}")
    tgt = open_extract(target, "target", workers)
    srcs = [open_extract(ref, f"source {i + 1}", workers) for i, ref in enumerate(source_refs)]
    check_stores(tgt, srcs, [target, *source_refs])
    count, todo = _num_shards(shard, num_shards, out, tgt)

    methods = _methods(method, len(srcs))
    vmaps = [_source_map(tgt, s, m, vocab_map_cache, workers) for s, m in zip(srcs, methods)]
    max_length = int(tgt.settings.get("max_length") or max((len(w.input_ids) for w in tgt.iter_windows()), default=1))
    settings = {
        "format_version": FORMAT_VERSION,
        "corpus_fingerprint": tgt.corpus_fingerprint,
        "n_texts": int(tgt.n_texts),
        "num_shards": count,
        "row_group_rows": row_group_rows(max_length),
        "ks": [int(tgt.k), *[int(s.k) for s in srcs]],
        "target": _identity(tgt),
        "sources": [_identity(s) for s in srcs],
        "methods": [m.value for m in methods],
    }
    open_store(out, FORMAT, settings, extra={"extra_files": [REPORT, TIMINGS]})
    clean_temporaries(out)
    settings = read_manifest(out)["settings"]  # exactly what a reader sees
    # Ray tasks reopen the stores by (absolute) path; objects travel as they are.
    absolute = lambda ref: str(Path(ref).resolve()) if isinstance(ref, (str, Path)) else ref  # noqa: E731
    job = ShardJob(target=absolute(target), sources=[absolute(r) for r in source_refs], vmaps=vmaps, settings=settings, workers=workers)
    todo = [i for i in todo if not shard_is_complete(out, shard_filename(i, count))]

    t0 = time.perf_counter()
    results: list[ShardResult] = []
    if ray is not None:
        from fusekit.align.ray_runner import run_on_ray

        for result in run_on_ray(ray, job, todo, progress=progress):
            write_shard(out, count, result)
            results.append(result)
    else:
        with task_progress(progress) as bar:
            for i in todo:
                texts = shard_slice(int(settings["n_texts"]), i, count)
                task = bar.add_task(f"align shard {i}/{count} ({len(texts)} texts)", total=None)

                def tick(done: int, total: int, task=task) -> None:
                    bar.update(task, completed=done, total=total)

                result = align_shard(job, i, tick)
                write_shard(out, count, result)
                results.append(result)
    wall = time.perf_counter() - t0

    report = build_report(
        settings,
        complete_shards(out),
        vmaps,
        results,
        wall=wall,
        workers=workers or os.cpu_count() or 1,
        ray=ray,
        target_ref=_describe(target),
        source_refs=[_describe(r) for r in source_refs],
    )
    stable, timings = split_timings(report)
    write_json_atomic(stable, out / REPORT)
    write_json_atomic(timings, out / TIMINGS)
    if progress:
        print_report(report)
    return report
