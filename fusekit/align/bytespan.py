"""The candidates of the `bytespan` method: each source's top-k transferred onto the target's tokens of
whole texts by the chain-rule transfer on exact byte spans (`transfer.Transferer`, docs/ALIGN.md).

Unlike the 1:1 carry (`carry.py`), a text is transferred as a whole, not window by window: the result is
then cut at the target's window boundaries. Byte spans come from the tokens' own bytes and character
offsets; where the two models rendered different texts (chat templates), the source's spans are carried
into the target's text through the bytes both share. Perfect-source recall is measured on the same texts
(report.json). All of that runs in Rust, in parallel over the texts of a chunk with the GIL released
(`Transferer.run_texts`, `rust/src/whole_text.rs`; `spans.py` and `remap.py` are the Python references it
is tested against); only the cutting into windows and the counts stay here.

**Mass.** Each candidate row also records the mass it held before the transfer renormalised it
(`Transfer.mass`, Rust's `kept_mass`): the source's probability of the kept target pieces, i.e. the
aggregated chain-rule mass of the row's top k entries. So `probs · mass` is the transferred row itself —
at a 1:1 row the source row's top-k mass (plus its true token's exact probability where that fell out
of the top-k), at an n:1 row the true path's mass times the next rows' top-k mass (what the chain rule
could not score is left out), at a row that starts inside a source token (the later pieces of a 1:n
split) the conditional over the consistent top-k, which the transfer normalises by that top-k's mass (its
mass is ~1: the stored top-k cannot say how much of the source's full distribution the condition keeps)
— and 1 − mass is exactly what the transfer could not place. That choice, rather than
the source's top-k mass at the span's first source token, keeps `probs · mass` equal to the rows the
like-for-like CE reads (`true_prob` = probs[truth] · mass), so the divergence losses see the distribution
the fusion metric scored. Fallback rows (one-hot) have mass 1, each window's empty last row 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusekit.align.candidates import SourceStats, bad_target_ids, kept_mass, mean_or_nan
from fusekit.align.inputs import ExtractedText
from fusekit.align.recall import perfect_logp
from fusekit.align.transfer import TextItem, TextTokens, Transferer
from fusekit.store.errors import StoreError
from fusekit.store.types import AlignedWindow, Candidate
from fusekit.vocab.info import VocabInfo

TEXT_CHUNK = 64  # texts per Transferer.run_texts call


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
    items = []
    for t in chunk:
        tt, st = t.target, t.source
        if tt.text is None or st.text is None:
            raise StoreError(
                "the byte-span transfer needs the texts, and these extraction stores were written without them "
                "(an older fusekit): re-run `fusekit extract`, or align with --method fusellm"
            )
        # Chat: each model rendered its own template around the same messages (source_text differs).
        items.append(
            TextItem(tt.text, TextTokens(st.ids, st.offsets), TextTokens(tt.ids, tt.offsets), st.topk_ids, st.topk_logp, -st.ce, st.text, t.text_id if recall else None)
        )
    k = max(1, chunk[0].source.topk_ids.shape[1]) if chunk else 1
    done = transferer.run_texts(items, k, perfect_logp(chunk[0].source.topk_ids.shape[1]) if chunk else (0.0, 0.0))
    bad = bad_target_ids(target_info)
    for t, (res, hits) in zip(chunk, done):
        st = t.source
        res_ce = res.ce  # over the whole text, before the windows' last rows are emptied
        lengths = np.asarray(t.lengths, np.int64)
        last = (np.cumsum(lengths) - 1)[lengths > 0]
        # Each window's last row predicts the next window's first token: empty (training never uses it).
        # The text's arrays are changed in place, and each window's candidate is a view of them.
        res.ids[last], res.probs[last], res.carried[last], res_ce[last] = -1, 0.0, False, np.nan
        res_mass = kept_mass(res.carried, res.mass, res.probs)
        lo = 0
        for w_i, n in enumerate(t.lengths):
            hi, m = lo + n, max(n - 1, 0)  # m: the window's predicted positions
            window = out[t.first + w_i]
            ids, probs, carried, ce = res.ids[lo:hi], res.probs[lo:hi], res.carried[lo:hi], res_ce[lo:hi]
            pred = np.ones(m, bool)
            if window.loss_mask is not None and n:
                pred &= np.asarray(window.loss_mask, bool)[1:]
            # Rows whose true-token probability is unknown (a source window's last row, whose next token the
            # extraction could not score, when the true token is also outside the top-k) have no CE: left in,
            # one NaN would make the whole window's mean unknown and hand the window to the target (MinCE).
            used = carried[:m] & pred & np.isfinite(ce[:m])
            mean_ce = mean_or_nan(ce[:m][used].astype(np.float64))
            window.candidates.append(Candidate(ids=ids, probs=probs, ce=ce, mean_ce=mean_ce, mass=res_mass[lo:hi]))
            stats.windows += 1
            stats.positions += m
            counted = carried[:m]
            stats.carried += int(counted.sum())
            if hits is not None:
                stats.recalled += int(hits[lo : lo + m].sum())
            if not counted.any():
                stats.empty_windows += 1
            rows = res.source_row[lo : lo + m][counted]
            if rows.size:
                lp = st.topk_logp[rows].astype(np.float64)
                present = (st.topk_ids[rows] >= 0) & np.isfinite(lp)
                stats.topk_mass += float(np.where(present, np.exp(np.where(present, lp, 0.0)), 0.0).sum())
            live = ids[:m][counted]
            stats.bad_mass += float(np.where((live >= 0) & bad[np.maximum(live, 0)], probs[:m][counted], 0.0).sum())
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
