"""Byte spans of tokens in their text, from the character offsets tokenizers report.

Tokenizers report where each token starts in characters (code points). Byte-level tokenizers split a
multi-byte character across tokens that then share one character offset, so character offsets cannot
say which of those tokens holds which byte, and a window or a span cut at a character offset can hand a
byte token to the wrong side. Here every token gets an exact byte span: [its start, the next token's
start), converted to bytes through the text, and tokens that share a start split that run of bytes in
order by their own byte lengths (when they add up; otherwise the last token takes the run).
"""

from __future__ import annotations

import numpy as np


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the UTF-8 byte offset of every character offset (and of the end)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def byte_spans(text: str, char_starts: np.ndarray, token_lengths: np.ndarray) -> np.ndarray:
    """int64 [n, 2]: (start, end) byte offsets of each token of `text`.

    `char_starts` int [n]: each token's start in characters, non-decreasing (a token may start at
    len(text): an appended end-of-sequence token, whose span is empty). `token_lengths` int [n]: each
    token's own length in bytes (its vocabulary entry), used only to split a shared start.
    Raises ValueError on offsets outside the text or out of order.
    """
    starts = np.asarray(char_starts, dtype=np.int64)
    n = len(starts)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    c2b = char_to_byte(text)
    if starts.min() < 0 or starts.max() > len(text) or np.any(np.diff(starts) < 0):
        raise ValueError(f"token offsets must be non-decreasing character offsets within the text of {len(text)} characters")
    b = c2b[starts]
    ends = np.empty(n, dtype=np.int64)
    ends[:-1] = b[1:]
    ends[-1] = c2b[-1]
    spans = np.stack([b, ends], axis=1)
    shared = np.flatnonzero(np.diff(starts) == 0)
    if shared.size:
        lengths = np.asarray(token_lengths, dtype=np.int64)
        i = 0
        heads = np.unique(np.concatenate([shared[np.r_[True, np.diff(shared) > 1]]]))
        for head in heads.tolist():
            i = head
            while i + 1 < n and starts[i + 1] == starts[head]:
                i += 1
            group = slice(head, i + 1)
            lo, hi = b[head], ends[i]
            lens = lengths[group]
            if lens.sum() == hi - lo and np.all(lens > 0):
                cut = lo + np.concatenate([[0], np.cumsum(lens)])
                spans[group, 0], spans[group, 1] = cut[:-1], cut[1:]
            else:
                spans[group, 0] = lo
                spans[head:i, 1] = lo
                spans[i, 1] = hi
    return spans
