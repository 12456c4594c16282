"""The candidates of the `bytespan` method: each source's top-k transferred onto the target's tokens of
whole texts by the chain-rule transfer on exact byte spans (`transfer.Transferer`, docs/ALIGN.md).

Unlike the 1:1 carry (`carry.py`), a text is transferred as a whole, not window by window: the result is
then cut at the target's window boundaries. Byte spans come from the tokens' own bytes and character
offsets; where the two models rendered different texts (chat templates), the source's spans are carried
into the target's text through the bytes both share (`remap.py`). Perfect-source recall is measured on
the same texts (report.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusekit.align.candidates import SourceStats, bad_target_ids, mean_or_nan
from fusekit.align.inputs import ExtractedText
from fusekit.align.recall import perfect_source_topk, recalled
from fusekit.align.remap import remap_spans
from fusekit.align.transfer import TextTokens, Transferer
from fusekit.store.errors import StoreError
from fusekit.store.types import AlignedWindow, Candidate
from fusekit.vocab.info import VocabInfo

TEXT_CHUNK = 64  # texts per transfer_batch call


@dataclass
class WholeText:
    """One text for the byte-span transfer: the target's windows (from slot `first`) and the source."""

    text_id: int
    first: int
    lengths: list[int]
    target: ExtractedText
    source: ExtractedText


def bytespan_candidates(
    chunk: Sequence[WholeText], transferer: Transferer, out: list[AlignedWindow], target_info: VocabInfo, stats: SourceStats,
    recall: bool = True,
) -> None:
    """Transfer each text of `chunk` as a whole and append the source's candidate to its target windows.

    A window's last row is left empty (its next token opens the next window; training never uses it).
    CE per row is the like-for-like CE (−ln of the source's probability of the target's next token);
    the window's mean CE averages it over the rows that carried and whose next token is a loss token.
    Also measures perfect-source recall on the same texts (report.json) unless `recall` is False (online
    distillation: no report, and the check would double the transfer's work).
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
        if recall:
            ids, lp = perfect_source_topk(st.ids, st.topk_ids.shape[1], len(transferer.source), seed=t.text_id)
            perfect.append((tt.text, src_tok, tgt_tok, ids, lp))
    k = max(1, chunk[0].source.topk_ids.shape[1]) if chunk else 1
    results = transferer.run(items, k)
    checks = transferer.run(perfect, k) if recall else [None] * len(results)
    bad = bad_target_ids(target_info)
    for t, res, chk in zip(chunk, results, checks):
        st = t.source
        hits = recalled(chk, t.target.ids) if chk is not None else np.zeros(len(t.target.ids), bool)
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
            mean_ce = mean_or_nan(ce[: max(n - 1, 0)][used].astype(np.float64))
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


def transfer_whole_texts(
    texts: Sequence[WholeText],
    transferer: Transferer,
    out: list[AlignedWindow],
    target_info: VocabInfo,
    stats: SourceStats,
    on_chunk: Callable[[int], None] | None = None,
    recall: bool = True,
) -> None:
    """`bytespan_candidates` over `texts` in chunks of `TEXT_CHUNK` texts. `on_chunk(n)`: called after each
    chunk with its number of target tokens (progress)."""
    for lo in range(0, len(texts), TEXT_CHUNK):
        chunk = texts[lo : lo + TEXT_CHUNK]
        bytespan_candidates(chunk, transferer, out, target_info, stats, recall)
        if on_chunk is not None:
            on_chunk(sum(len(t.target.ids) for t in chunk))
