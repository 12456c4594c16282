"""The 1:1 carry of the `fusellm` and `fusechat` methods (FUSION-METHOD.md §2–3): a source's top-k onto
each target window, through DTW and a vocabulary map (FuseLLM's, or FuseChat's statistical one).

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
* **The candidate**, per source and target window: CE at a carried position = the source's own CE at
  the aligned source position (−log p of *its* next token; NaN where it fell back, or where the source
  has no CE, i.e. at the end of a source window) and mean CE = the source's mean CE over the source
  tokens of the span (its metric on the same text, as the reference's per-sequence metric). Its mass
  at a carried position is the source row's top-k mass that the carry kept (the entries whose id maps
  to a target id: `tokens.carried_mass`), 1 on a one-hot fallback, 0 on the empty last row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusekit.align.candidates import SourceStats, bad_target_ids, kept_mass, mean_or_nan
from fusekit.align.inputs import ExtractedText
from fusekit.align.recall import recalled_rows
from fusekit.align.tokens import DTW_CHUNK, TokenTable, align_ids_batch, align_topk, carried_mass
from fusekit.align.vocab_cache import VocabMap
from fusekit.store.types import Candidate
from fusekit.vocab.info import VocabInfo


@dataclass
class PendingWindow:
    """One (target window, source) pair waiting for its DTW: the window's tokens and the source tokens
    that start in its character span."""

    slot: int  # index of the target window in the shard's output
    tgt_ids: np.ndarray
    src: ExtractedText
    sel: np.ndarray | slice


def source_candidate(
    p: PendingWindow, path: np.ndarray | None, vmap: VocabMap, stats: SourceStats, target_info: VocabInfo | None = None, one_to_one: bool = False
) -> Candidate:
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
        mass = kept_mass(np.zeros(n, bool), np.zeros(n), probs)
        return Candidate(ids=ids, probs=probs, ce=np.full(n, np.nan, dtype=np.float32), mean_ce=math.nan, mass=mass)
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
        bad = bad_target_ids(target_info)
        live = out.ids[:-1][counted] if n else out.ids[:0]
        stats.bad_mass += float(np.where((live >= 0) & bad[np.maximum(live, 0)], out.probs[:-1][counted], 0.0).sum())
        pk_ids, pk_lp = s.perfect(len(vmap.ids), seed=0)
        chk = align_topk(path, src_ids, tgt_ids, vmap.ids, pk_ids[p.sel], pk_lp[p.sel], one_to_one=one_to_one)
        stats.recalled += int(recalled_rows(chk.ids, chk.probs, chk.carried, tgt_ids).sum())
    metric = s.metric[p.sel]
    mass = kept_mass(carried, carried_mass(carried, pos, topk_ids, topk_logp, vmap.ids), out.probs)
    return Candidate(ids=out.ids, probs=out.probs, ce=ce, mean_ce=mean_or_nan(ce_src[metric].astype(np.float64)), mass=mass)


def carry_candidates(
    items: Sequence[PendingWindow],
    src_table: TokenTable,
    tgt_table: TokenTable,
    vmap: VocabMap,
    stats: SourceStats,
    target_info: VocabInfo,
    one_to_one: bool,
    threads: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[Candidate]:
    """One source's candidate for each pending window, in order: DTW in chunks of `DTW_CHUNK` windows on
    `threads` threads, then `source_candidate`. `on_chunk(n)`: called after each chunk with its number
    of target tokens (progress)."""
    cands: list[Candidate] = []
    for lo in range(0, len(items), DTW_CHUNK):
        chunk = items[lo : lo + DTW_CHUNK]
        live = [(n, p) for n, p in enumerate(chunk) if len(p.src.ids[p.sel]) and len(p.tgt_ids)]
        paths = align_ids_batch(src_table, tgt_table, [(p.src.ids[p.sel], p.tgt_ids) for _, p in live], threads=threads)
        by_item: dict[int, np.ndarray] = {n: path for (n, _), path in zip(live, paths)}
        for n, p in enumerate(chunk):
            cands.append(source_candidate(p, by_item.get(n), vmap, stats, target_info, one_to_one))
        if on_chunk is not None:
            on_chunk(sum(len(p.tgt_ids) for p in chunk))
    return cands
