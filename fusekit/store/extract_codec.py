"""Coding one extraction shard: windows (exact values) ⇄ the shard's rows and Parquet metadata.

A shard's rows are (text_id, window, char_start, char_end, n_tokens, mean_ce, has_mask, payload, text).
The payload is one window coded by the Rust codec (`rust/src/codec.rs`, "topk-rc/2"): input tokens,
offsets, top-k ids and quantised log-probs, CE, loss mask, all through an adaptive range coder, with
ids as ranks in the shard's table and every window's models started from the shard's prior (both in
the file's metadata: `extract_format.py`). `encode_shard` also measures what the quantisation lost
(`ShardStats`, kept in the shard's sidecar for `fusekit inspect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

import fusekit._core as _core
from fusekit.store.errors import StoreError
from fusekit.store.extract_format import (
    CE_BIN,
    CE_BINS,
    CODEC,
    DEFAULT_KNEE,
    DEFAULT_STEP,
    FORMAT,
    FRESH_CODEC,
    encode_prior,
    encode_rank_table,
    rank_table,
)
from fusekit.store.types import Window

_SCHEMA = {
    "text_id": pl.Int64,
    "window": pl.Int32,
    "char_start": pl.Int64,
    "char_end": pl.Int64,
    "n_tokens": pl.Int32,
    "mean_ce": pl.Float64,
    "has_mask": pl.Boolean,
    "payload": pl.Binary,
    "text": pl.String,
}


@dataclass
class ShardStats:
    """What the writer measured while coding one shard (kept in its sidecar for `fusekit inspect`)."""

    windows: int = 0
    tokens: int = 0
    predicted: int = 0  # positions with a next token
    payload_bytes: int = 0
    kl_sum: float = 0.0  # Σ KL(original top-k ‖ stored), both renormalised over the k slots
    kl_max: float = 0.0
    mass_sum: float = 0.0  # Σ top-k probability mass kept
    ce_sum: float = 0.0
    ce_hist: list | None = None

    def as_dict(self) -> dict:
        return {
            "windows": self.windows,
            "tokens": self.tokens,
            "predicted": self.predicted,
            "payload_bytes": self.payload_bytes,
            "kl_sum": self.kl_sum,
            "kl_max": self.kl_max,
            "mass_sum": self.mass_sum,
            "ce_sum": self.ce_sum,
            "ce_hist": self.ce_hist or [0] * CE_BINS,
        }


def encode_shard(
    windows: Sequence[Window],
    *,
    k: int,
    vocab_size: int,
    step: float = DEFAULT_STEP,
    knee: float = DEFAULT_KNEE,
    metadata: dict[str, str] | None = None,
    threads: int | None = None,
    primed: bool = True,
) -> tuple[pl.DataFrame, dict[str, str], ShardStats]:
    """Code `windows` (exact values) into the shard's frame and Parquet metadata, measuring the loss.

    `primed`: learn the shard's codec prior from `windows` and start every window from it (CODEC);
    False codes every window from fresh models (FRESH_CODEC, the older format: for comparisons).
    """
    windows = sorted(windows, key=lambda w: (w.text_id, w.window))
    table = rank_table(windows, vocab_size)
    to_rank = np.zeros(vocab_size, dtype=np.uint32)
    to_rank[table] = np.arange(len(table), dtype=np.uint32)
    args = []
    stats = ShardStats(ce_hist=[0] * CE_BINS)
    hist = np.zeros(CE_BINS, dtype=np.int64)
    for w in windows:
        n = len(w.input_ids)
        if w.topk_ids.shape != (n, k) or w.topk_logp.shape != (n, k) or w.ce.shape != (n,):
            raise StoreError(f"text {w.text_id} window {w.window}: arrays do not match {n} tokens and k = {k}")
        ce = np.nan_to_num(w.ce.astype(np.float32), nan=np.nan, posinf=1000.0)
        args.append(
            (
                to_rank[w.input_ids],
                np.ascontiguousarray(w.offsets, dtype=np.int64),
                int(w.char_start),
                to_rank[w.topk_ids],
                np.ascontiguousarray(w.topk_logp, dtype=np.float32),
                np.ascontiguousarray(np.minimum(ce, 1000.0), dtype=np.float32),
                None if w.loss_mask is None else np.ascontiguousarray(w.loss_mask, dtype=bool),
            )
        )
        stats.windows += 1
        stats.tokens += n
        stats.predicted += max(n - 1, 0)
        stats.mass_sum += float(np.exp(w.topk_logp.astype(np.float64)).sum())
        pred = w.ce[: n - 1].astype(np.float64)
        stats.ce_sum += float(pred.sum())
        hist += np.bincount(np.minimum((pred / CE_BIN).astype(np.int64), CE_BINS - 1), minlength=CE_BINS)
    try:
        prior = _core.codec_train_prior(args, k, step, threads, knee) if primed else None
        coded = _core.codec_encode_windows(args, k, step, threads, knee, prior)
    except ValueError as exc:
        raise StoreError(f"cannot code the shard: {exc}") from None
    payloads = []
    for blob, kl_sum, kl_max in coded:
        payloads.append(blob)
        stats.payload_bytes += len(blob)
        stats.kl_sum += kl_sum
        stats.kl_max = max(stats.kl_max, kl_max)
    stats.ce_hist = hist.tolist()
    frame = pl.DataFrame(
        {
            "text_id": [w.text_id for w in windows],
            "window": [w.window for w in windows],
            "char_start": [int(w.char_start) for w in windows],
            "char_end": [int(w.char_end) for w in windows],
            "n_tokens": [len(w.input_ids) for w in windows],
            "mean_ce": [float(w.mean_ce) for w in windows],
            "has_mask": [w.loss_mask is not None for w in windows],
            "payload": payloads,
            "text": [w.text for w in windows],
        },
        schema=_SCHEMA,
    )
    meta = {
        "fusekit.format": FORMAT,
        "fusekit.codec": CODEC if primed else FRESH_CODEC,
        "fusekit.codec_doc": "payload: one window per row, adaptive binary range coder (rust/src/codec.rs); "
        "ids are ranks in fusekit.rank_table (base64(zlib(LEB128 ids in rank order)))"
        + ("; every window's models start from fusekit.codec_prior (base64(zlib(one level 0..64 per cell)))" if primed else ""),
        "fusekit.k": str(k),
        "fusekit.step": repr(step),
        "fusekit.knee": repr(knee),
        "fusekit.rank_table": encode_rank_table(table),
        **({"fusekit.codec_prior": encode_prior(prior)} if primed else {}),
        **(metadata or {}),
    }
    return frame, meta, stats


def decode_frame(
    frame: pl.DataFrame,
    table: np.ndarray,
    k: int,
    step: float,
    knee: float = DEFAULT_KNEE,
    threads: int | None = None,
    prior: bytes | None = None,
) -> list[Window]:
    """The windows of a slice of a shard's frame (exact ids; log-probs and CE as stored).

    `table` and `prior` come from the shard's metadata (`shard_codec`); prior None = fresh models.
    """
    rows = frame.select("text_id", "window", "char_start", "char_end", "n_tokens", "mean_ce", "has_mask", "payload").rows()
    texts = frame["text"].to_list() if "text" in frame.columns else [None] * frame.height
    try:
        decoded = _core.codec_decode_windows([(r[7], r[4], r[2], r[6]) for r in rows], k, step, threads, knee, prior)
    except ValueError as exc:
        raise StoreError(f"cannot decode a window: {exc}") from None
    out = []
    for r, text, (inp, offsets, topk, logp, ce, mask) in zip(rows, texts, decoded):
        if len(table) and (inp.size and inp.max() >= len(table) or topk.size and topk.max() >= len(table)):
            raise StoreError(f"text {r[0]} window {r[1]}: a token rank beyond the shard's table (damaged file)")
        out.append(
            Window(
                text_id=r[0],
                window=r[1],
                char_start=r[2],
                char_end=r[3],
                input_ids=table[inp].astype(np.int64),
                offsets=offsets,
                topk_ids=table[topk].astype(np.int32),
                topk_logp=logp,
                ce=ce,
                mean_ce=r[5],
                loss_mask=mask,
                text=text,
            )
        )
    return out
