"""Source token spans carried into the target's text when the two models saw different texts.

Chat records are rendered by each model's own template, so the source's text and the target's text
differ around the messages while every message's content appears in both. The byte blocks the two
texts share (`difflib`'s matching blocks) carry a source token's span into the target's text when the
token lies inside one block; every other source token (its template's markup, or a token straddling
content and markup) gets an empty span there, so no target position is ever aligned to template tokens.

The store path runs the Rust port (`rust/src/spans.rs`: `difflib`'s longest-match search step for step);
this is its reference, compared in `tests/test_align_parallel.py`.
"""

from __future__ import annotations

import difflib

import numpy as np


def remap_spans(src_text: bytes, tgt_text: bytes, spans: np.ndarray) -> np.ndarray:
    """int64 [m, 2]: source byte `spans` [m, 2] (in `src_text`) as byte spans in `tgt_text`.

    Spans stay non-decreasing; a token outside the shared blocks gets an empty span at the mapped end of
    the token before it.
    """
    spans = np.asarray(spans, dtype=np.int64)
    if src_text == tgt_text:
        return spans.copy()
    blocks = [b for b in difflib.SequenceMatcher(None, src_text, tgt_text, autojunk=False).get_matching_blocks() if b.size]
    out = np.empty_like(spans)
    last = 0
    bi = 0
    for i, (s, e) in enumerate(spans.tolist()):
        while bi < len(blocks) and blocks[bi].a + blocks[bi].size <= s and not (e == s == blocks[bi].a + blocks[bi].size):
            bi += 1
        mapped = None
        if bi < len(blocks):
            a, b, size = blocks[bi]
            if a <= s and e <= a + size and e > s:
                mapped = (s - a + b, e - a + b)
        if mapped is None:
            out[i] = (last, last)
        else:
            out[i] = mapped
            last = mapped[1]
    return out
