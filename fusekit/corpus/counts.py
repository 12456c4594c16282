"""Tokens and windows of a corpus under several tokenizers: exact for a small corpus, else estimated from
size-weighted draws (`sample.py`) sized to a stated error, so the cost does not grow with the corpus.

Draws are added in rounds until every tokenizer's token estimate is within `target_error` (95 %
half-width, relative) or `max_draws` is reached; the result says which, and how many texts it read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np

from fusekit.corpus.reader import open_source, read_records
from fusekit.corpus.records import Record
from fusekit.corpus.sample import Draw, chunk_of, draw, estimate
from fusekit.corpus.sources import Source
from fusekit.corpus.tokenize import tokenize_record, windows_of

EXACT_BYTES = 2_000_000  # a corpus this small is tokenised whole
TARGET_ERROR = 0.02
FIRST_DRAWS = 512
MAX_DRAWS = 16_384
CHUNK_CHARS = 2048  # a long drawn text is counted on one chunk of this many characters


@dataclass
class Counts:
    """Per tokenizer name: tokens and windows over the corpus (exact or estimated), and how they were found."""

    texts: float
    tokens: dict[str, float]
    windows: dict[str, float]
    method: str  # "exact" or "sampled"
    error: float = 0.0  # the largest 95 % half-width over tokenizers, relative to the estimate
    draws: int = 0  # texts drawn (with replacement)
    clusters: int = 0  # independent first-stage draws (row groups for Parquet/Arrow)
    records: list[Record] = dc_field(default_factory=list)  # exact: every record; sampled: the drawn ones

    def describe(self) -> str:
        if self.method == "exact":
            return "every text tokenised"
        return f"estimated from {self.draws:,} size-weighted draws ({self.clusters:,} clusters), ±{self.error:.1%} at 95 %"


def _text_count(record: Record, tokenizer, append_eos: bool) -> int:
    return len(tokenize_record(tokenizer, record, append_eos)[0])


def count_corpus(
    data: str | Source,
    field: str,
    tokenizers: dict[str, tuple[Any, int]],
    append_eos: bool = True,
    *,
    target_error: float = TARGET_ERROR,
    exact_bytes: int = EXACT_BYTES,
    max_draws: int = MAX_DRAWS,
    seed: int = 0,
) -> Counts:
    """Tokens and windows under each (tokenizer, window) of `tokenizers` (name → pair), as extraction counts
    them (the end-of-sequence token after each plain text with `append_eos`)."""
    source = open_source(data, field)
    if source.total_bytes() <= exact_bytes:
        records = list(read_records(source, field))
        tokens, windows = {}, {}
        for name, (tok, window) in tokenizers.items():
            lengths = [_text_count(r, tok, append_eos) for r in records]
            tokens[name] = float(sum(lengths))
            windows[name] = float(sum(len(windows_of(np.empty(n), window)) for n in lengths))
        return Counts(float(len(records)), tokens, windows, "exact", records=records)

    rng = np.random.default_rng(seed)
    draws: list[Draw] = []
    per_draw: dict[str, list[tuple[float, float]]] = {name: [] for name in tokenizers}
    want = FIRST_DRAWS
    while True:
        next_cluster = max((d.cluster for d in draws), default=-1) + 1
        new = draw(source, field, want - len(draws), rng, first_cluster=next_cluster)
        for name, (tok, window) in tokenizers.items():
            per_draw[name].extend(_draw_counts(new, tok, window, append_eos, rng))
        draws.extend(new)
        totals = {name: estimate(draws, [t for t, _ in per_draw[name]]) for name in tokenizers}
        error = max((half / total if total > 0 else math.inf) for total, half in totals.values())
        if error <= target_error or len(draws) >= max_draws or not new:
            break
        want = min(max_draws, 2 * len(draws))
    texts = estimate(draws, [float(len(d.records)) for d in draws])[0]
    return Counts(
        texts, {n: t for n, (t, _) in totals.items()}, {n: estimate(draws, [w for _, w in per_draw[n]])[0] for n in tokenizers},
        "sampled", error, len(draws), len({d.cluster for d in draws}), [r for d in draws for r in d.records],
    )


def _draw_counts(draws: list[Draw], tok, window: int, append_eos: bool, rng) -> list[tuple[float, float]]:
    """(tokens, windows) of each draw's records, plain texts tokenised in one batch; a long plain text is
    counted on one chunk of it (`chunk_of`)."""
    out = [[0.0, 0.0] for _ in draws]
    pieces: list[str] = []
    owners: list[tuple[int, float, int]] = []  # (draw, scale, end-of-sequence tokens)
    has_eos = append_eos and isinstance(getattr(tok, "eos_token_id", None), int)
    for j, d in enumerate(draws):
        for r in d.records:
            if r.text is None:  # chat: rendered by the template, counted whole
                n = _text_count(r, tok, append_eos)
                out[j][0] += n
                out[j][1] += math.ceil(n / window)
            else:
                piece, scale = chunk_of(r.text, rng, CHUNK_CHARS)
                pieces.append(piece)
                owners.append((j, scale, int(has_eos and r.eos)))
    if pieces:
        lengths = [len(ids) for ids in tok(pieces, add_special_tokens=False, verbose=False)["input_ids"]]
        for (j, scale, eos), n in zip(owners, lengths):
            total = n * scale + eos
            out[j][0] += total
            out[j][1] += math.ceil(total / window)
    return [(t, w) for t, w in out]
