"""Byte spans of tokens in their text, from the character offsets tokenizers report.

Tokenizers report where each token starts in characters (code points). Byte-level tokenizers split a
multi-byte character across tokens that then share one character offset, so character offsets cannot
say which of those tokens holds which byte, and a window or a span cut at a character offset can hand a
byte token to the wrong side. Here every token gets an exact byte span, following the token's own bytes
through the text wherever they spell it.

The byte-span transfer computes these spans in Rust (`rust/src/spans.rs`, `Transferer.spans`), in
parallel with the GIL released; this module is the readable reference with the same rules, which
`tests/test_align_parallel.py` compares it against on real tokenizers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the UTF-8 byte offset of every character offset (and of the end)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def byte_spans(text: str, char_starts: np.ndarray, token_bytes: Sequence[bytes], data: bytes | None = None) -> np.ndarray:
    """int64 [n, 2]: (start, end) byte offsets of each token of `text`.

    `char_starts` int [n]: each token's start in characters, non-decreasing (a token may start at
    len(text): an appended end-of-sequence token, whose span is empty). `token_bytes[i]`: token i's own
    bytes (its vocabulary entry; b"" for special tokens). Where the tokens spell the text byte for byte
    (byte-level BPE), the spans follow the bytes, so the pieces of a split character each get their own
    bytes; elsewhere (a normaliser, SentencePiece's dummy-prefix space, dropped characters) a token spans
    from its character start to the next token's start. Raises ValueError on offsets outside the text or
    out of order.
    """
    starts = np.asarray(char_starts, dtype=np.int64)
    n = len(starts)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if starts.min() < 0 or starts.max() > len(text) or np.any(np.diff(starts) < 0):
        raise ValueError(f"token offsets must be non-decreasing character offsets within the text of {len(text)} characters")
    c2b = char_to_byte(text)
    data = text.encode("utf-8", "surrogatepass") if data is None else data
    first = int(c2b[starts[0]])
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, n)
    joined = b"".join(token_bytes)
    # Offsets may leave out a token's leading whitespace (trim_offsets): start where the bytes spell the text.
    lead = len(token_bytes[0]) - len(token_bytes[0].lstrip())
    for at in dict.fromkeys((first, first - lead)):
        if at >= 0 and data.startswith(joined, at):
            cum = at + np.concatenate([[0], np.cumsum(lengths)])
            return _close_specials(np.stack([cum[:-1], cum[1:]], axis=1), lengths, c2b, starts)
    return _walk(data, c2b, starts, token_bytes)


def _close_specials(spans: np.ndarray, lengths: np.ndarray, c2b: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Tokens without bytes (special tokens) sit empty at their own start."""
    empty = lengths == 0
    if empty.any():
        spans[empty, 0] = spans[empty, 1] = np.maximum(c2b[starts[empty]], spans[empty, 0])
    return spans


def _walk(data: bytes, c2b: np.ndarray, starts: np.ndarray, token_bytes: Sequence[bytes]) -> np.ndarray:
    n = len(starts)
    spans = np.empty((n, 2), dtype=np.int64)
    open_end = np.zeros(n, dtype=bool)
    cursor = int(c2b[starts[0]])
    for i in range(n):
        char_at = int(c2b[starts[i]])
        tb = token_bytes[i]
        placed = False
        for pos in dict.fromkeys((cursor, max(cursor, char_at))):  # here, else past characters the tokenizer dropped
            if tb and data.startswith(tb, pos):
                spans[i], placed = (pos, pos + len(tb)), True
            elif len(tb) > 1 and tb[:1] == b" " and data.startswith(tb[1:], pos):
                spans[i], placed = (pos, pos + len(tb) - 1), True  # SentencePiece's dummy-prefix space
            if placed:
                break
        if not placed:
            pos = max(cursor, char_at)
            spans[i] = (pos, pos)
            open_end[i] = bool(tb)  # spans to the next token's start (normalised text)
        cursor = int(spans[i, 1])
    for i in np.flatnonzero(open_end).tolist():
        nxt = spans[i + 1, 0] if i + 1 < n else len(data)
        spans[i, 1] = max(spans[i, 0], nxt)
    return spans
