"""One shard's compute: tokenise its texts, run the model over its windows, code them (nothing is written).

The same function runs in a serial run and on every Ray worker, so their files are byte-identical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusekit.corpus import TokenizedText, tokenize_with_offsets, windows_of
from fusekit.extract.errors import ExtractError
from fusekit.extract.model import forward_topk, forward_topk_packed
from fusekit.models.packing import pack_windows, packing_supported
from fusekit.store.atomic import parquet_bytes
from fusekit.store.extract_codec import encode_shard
from fusekit.store.extract_format import CODEC, FRESH_CODEC
from fusekit.store.shards import shard_filename, shard_slice
from fusekit.store.types import Window


@dataclass
class ShardOutput:
    """One computed shard, not yet written: its Parquet bytes and sidecar entries."""

    index: int
    name: str
    data: bytes
    info: dict
    tokens: int


def compute_shard(net, tokenizer, records, index, num_shards, n_texts, settings, digest, batch_size, bar, pack: bool = True) -> ShardOutput:
    """Run the model over one shard's records and code it (nothing is written here)."""
    k, vocab_size, window = settings["k"], settings["vocab_size"], settings["max_length"]
    first = shard_slice(n_texts, index, num_shards).start
    texts = [tokenize_text(tokenizer, record, first + offset, vocab_size, settings.get("append_eos", False))
             for offset, record in enumerate(records)]
    name = shard_filename(index, num_shards)
    tokens = sum(len(t.input_ids) for _, t in texts)
    task = bar.add_task(f"{settings['model']} {index + 1}/{num_shards}", total=tokens)
    windows = model_windows(net, texts, k, vocab_size, window, batch_size, pack, lambda n: bar.update(task, advance=n))
    frame, meta, stats = encode_shard(
        windows, k=k, vocab_size=vocab_size, step=settings["codec_step"], knee=settings["codec_knee"],
        metadata={"fusekit.settings_sha256": digest, "fusekit.shard": f"{index}/{num_shards}"},
        primed=settings.get("codec", CODEC) != FRESH_CODEC,
    )
    data = parquet_bytes(frame, meta)
    span = shard_slice(n_texts, index, num_shards)
    info = {
        **stats.as_dict(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": frame.height,
        "texts": [span.start, span.stop],
    }
    bar.update(task, visible=False)
    return ShardOutput(index, name, data, info, tokens)


def tokenize_text(tokenizer, record, text_id: int, vocab_size: int, append_eos: bool) -> tuple[int, TokenizedText]:
    """(text_id, the record as the model sees it); ExtractError on an id outside the model's logits."""
    tok = tokenize_with_offsets(tokenizer, record, append_eos)
    if tok.input_ids.size and (tok.input_ids.min() < 0 or tok.input_ids.max() >= vocab_size):
        raise ExtractError(f"text {text_id}: the tokenizer produced an id outside the model's {vocab_size} logits")
    return text_id, tok


def model_windows(
    net, texts: Sequence[tuple[int, TokenizedText]], k: int, vocab_size: int, window: int, batch_size: int,
    pack: bool = True, on_tokens: Callable[[int], None] | None = None,
) -> list[Window]:
    """Every text cut into windows of `window` tokens and run through `net`: its top-k, CE and mean CE per
    window, in text order (what an extraction shard stores before coding; online distillation uses the
    same windows without a store). `on_tokens(n)`: called after each batch with its tokens (progress)."""
    pieces: list[tuple[int, int, int, int, np.ndarray, np.ndarray, np.ndarray | None, str]] = []
    for text_id, tok in texts:
        n = len(tok.input_ids)
        for w, (s, e) in enumerate(windows_of(tok.input_ids, window)):
            char_end = int(tok.offsets[e]) if e < n else len(tok.text)
            char_start = 0 if w == 0 else int(tok.offsets[s])  # window 0 holds the text's start, even untokenised
            pieces.append(
                (text_id, w, char_start, char_end, tok.input_ids[s:e], tok.offsets[s:e],
                 None if tok.mask is None else tok.mask[s:e], tok.text[char_start:char_end])
            )
    results: dict[int, Window] = {}
    advance = on_tokens or (lambda n: None)

    def keep(i: int, r) -> None:
        text_id, w, cs, ce_, ids, offs, mask, text = pieces[i]
        pred = r.ce[:-1].astype(np.float64)
        results[i] = Window(
            text_id=text_id, window=w, char_start=cs, char_end=ce_, input_ids=ids, offsets=offs,
            topk_ids=r.topk_ids, topk_logp=r.topk_logp, ce=r.ce,
            mean_ce=float(pred.mean()) if pred.size else float("nan"), loss_mask=mask, text=text,
        )

    # The grouping is a pure function of the window lengths, so a shard's bytes are deterministic.
    token_ids = [p[4] for p in pieces]
    if pack and packing_supported(net, vocab_size):
        rows = pack_windows([len(t) for t in token_ids], window)  # each row ≤ one window of tokens
        for lo in range(0, len(rows), batch_size):
            group = rows[lo : lo + batch_size]
            for i, r in forward_topk_packed(net, token_ids, group, k, vocab_size).items():
                keep(i, r)
            advance(sum(len(token_ids[i]) for row in group for i in row))
    else:
        # Longest first, so a batch pads little.
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][4]))
        for lo in range(0, len(order), batch_size):
            chosen = order[lo : lo + batch_size]
            for i, r in zip(chosen, forward_topk(net, [token_ids[i] for i in chosen], k, vocab_size)):
                keep(i, r)
            advance(sum(len(token_ids[i]) for i in chosen))
    return [results[i] for i in range(len(pieces))]
