"""`fusekit prepare`: cut long texts once, for every model, into pieces each model sees whole.

Each model's extraction cuts a text into windows of its own tokens, so a source's window boundary falls
inside a target window: the source predicts the tokens after it without context (its CE there is high,
and its window mean CE, which MinCE compares, is biased). Cutting the corpus once, before extraction, into
pieces of at most `max_length` tokens under *every* model's tokenizer removes those boundaries: each piece
is one window for every model, with the same context. Pieces end at line breaks where possible (else at
spaces, else anywhere), so no piece boundary splits a character, and every model tokenises each piece on
its own. Only the last piece of a document keeps the end-of-sequence token (`"eos": false` on the others).

The output is JSONL (`{"text": …}` per piece, chat records copied unchanged) for `fusekit extract` /
`fusekit run`; FuseLLM's reference does the same split with one tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from fusekit.corpus import CorpusError, CorpusStats, read_records
from fusekit.store.atomic import write_bytes_atomic


@dataclass
class PrepareStats:
    texts: int = 0  # documents read
    pieces: int = 0  # pieces written
    cut: int = 0  # documents cut into more than one piece
    skipped: str = ""  # what reading skipped (empty or non-UTF-8 texts), "" when nothing


def _longest(tokenizers: Sequence[Any], text: str) -> int:
    return max(len(t(text, add_special_tokens=False)["input_ids"]) for t in tokenizers)


def _split_units(text: str) -> list[str]:
    """Lines (with their line break), the natural cut points."""
    return text.splitlines(keepends=True) or [text]


def _pieces(text: str, tokenizers: Sequence[Any], budget: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each at most `budget` tokens under every tokenizer."""
    if _longest(tokenizers, text) <= budget:
        yield text
        return
    units = [u for u in _split_units(text) if u]
    if len(units) <= 1:
        words = text.split(" ")
        units = [u for u in [w + " " for w in words[:-1]] + [words[-1]] if u]
    if len(units) <= 1:  # one unbroken run (a long word, CJK, base64): halves by characters
        mid = len(text) // 2
        if mid == 0:
            yield text
            return
        yield from _pieces(text[:mid], tokenizers, budget)
        yield from _pieces(text[mid:], tokenizers, budget)
        return
    # With two or more units every piece below is a strict part of `text`, so the recursion ends.
    # Greedy on units; each closed piece is checked with the real tokenizers and split again if over.
    current = ""
    for unit in units:
        if current and _longest(tokenizers, current + unit) > budget:
            yield from _pieces(current, tokenizers, budget)
            current = ""
        current += unit
    if current:
        yield from _pieces(current, tokenizers, budget)


def prepare_corpus(
    data: str | Path, out: str | Path, tokenizers: Sequence[Any], max_length: int, field: str = "text", progress: bool = False
) -> PrepareStats:
    """Write DATA as pieces of at most `max_length` − 1 tokens under each of `tokenizers` (room for the
    end-of-sequence token) to the JSONL file OUT. `tokenizers`: transformers fast tokenizers of every model
    that will be extracted. Raises CorpusError on unreadable data or an empty corpus."""
    if max_length < 2:
        raise CorpusError(f"--max-length must be at least 2, got {max_length}")
    if not tokenizers:
        raise CorpusError("give the tokenizer (model) of every model that will be extracted")
    stats = PrepareStats()
    read = CorpusStats()
    lines: list[str] = []
    for record in read_records(data, field, read):
        stats.texts += 1
        if record.text is None:
            lines.append(json.dumps({"messages": record.messages}, ensure_ascii=False))
            stats.pieces += 1
            continue
        pieces = list(_pieces(record.text, tokenizers, max_length - 1))
        pieces = [p for p in pieces if p.strip()] or [record.text]
        stats.pieces += len(pieces)
        stats.cut += len(pieces) > 1
        for i, piece in enumerate(pieces):
            row = {field: piece} if i + 1 == len(pieces) else {field: piece, "eos": False}
            lines.append(json.dumps(row, ensure_ascii=False))
    if not stats.texts:
        raise CorpusError(f"no texts in {data} ({read.summary()})")
    stats.skipped = read.summary() if read.skipped else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(("\n".join(lines) + "\n").encode("utf-8"), out)
    return stats
