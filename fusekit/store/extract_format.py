"""What an extraction store's files say: its format and codec names, its side files, and the codec
metadata every shard's Parquet footer carries (the rank table and the codec prior).

A shard's payloads are coded by the Rust codec (`rust/src/codec.rs`, "topk-rc/2", see `extract_codec.py`).
Ids are coded as *ranks* in a per-shard table (ids sorted by how often they occur in the shard), which
the file's key-value metadata carries (`fusekit.rank_table`: base64 of zlib-compressed LEB128 ids in
rank order). Every window's coder starts from the shard's prior (`fusekit.codec_prior`: base64 of the
zlib-compressed levels `codec_train_prior` learnt from the shard's windows), so short texts cost no
more per token than long ones and any window still decodes on its own. Stores of "topk-rc/1" (fresh
models in every window, no prior) are still read.
"""

from __future__ import annotations

import base64
import zlib
from typing import Sequence

import numpy as np

from fusekit.store.errors import StoreError
from fusekit.store.types import Window

FORMAT = "fusekit.extract"
CODEC = "topk-rc/2"  # every window starts from the shard's prior (fusekit.codec_prior)
FRESH_CODEC = "topk-rc/1"  # every window starts from fresh models: older stores, still read
READABLE_CODECS = (CODEC, FRESH_CODEC)
# The top-k shape grid (rust/src/codec.rs, `Params`): `step` nats next to the top slot, widening by
# `knee` (the grid is step·(1 + d/knee) wide d nats below the top). Chosen on SmolLM2 distributions,
# see benchmarks/bench_extract.py and docs/EXTRACT.md.
DEFAULT_STEP = 0.125
DEFAULT_KNEE = 0.0
VOCAB_FILE = "vocab.json"
TOKENS_FILE = "tokens.json"  # what each id is (byte-fallback, special, empty) and the EOS id: vocab/info.py
CE_BIN = 0.25  # CE histogram bins of 0.25 nats from 0; the last bin holds everything beyond
CE_BINS = 80


def pad_token(index: int) -> str:
    """The placeholder string of a vocabulary id the tokenizer does not know (a padded embedding)."""
    return f"<fusekit:unused:{index}>"


# ---------------------------------------------------------------------------------------------
# The per-shard rank table


def _leb128(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while True:
            byte = v & 0x7F
            v >>= 7
            if v:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def _unleb128(data: bytes) -> np.ndarray:
    values, v, shift = [], 0, 0
    for byte in data:
        v |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            values.append(v)
            v, shift = 0, 0
    if shift:
        raise StoreError("rank table ends mid-number (damaged file)")
    return np.asarray(values, dtype=np.int64)


def encode_rank_table(table: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(_leb128(table), 9)).decode("ascii")


def decode_rank_table(text: str) -> np.ndarray:
    try:
        return _unleb128(zlib.decompress(base64.b64decode(text)))
    except (ValueError, zlib.error) as exc:
        raise StoreError(f"rank table cannot be read ({exc}); the shard is damaged") from None


def rank_table(windows: Sequence[Window], vocab_size: int) -> np.ndarray:
    """Ids by decreasing count in the shard (ties by id): rank r ↔ id table[r]."""
    ids = [np.asarray(w.input_ids, dtype=np.int64) for w in windows]
    ids += [np.asarray(w.topk_ids, dtype=np.int64).reshape(-1) for w in windows]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise StoreError(f"token ids outside the vocabulary 0..{vocab_size - 1}")
    counts = np.bincount(flat, minlength=vocab_size)
    present = np.flatnonzero(counts)
    order = np.lexsort((present, -counts[present]))
    return present[order]


def encode_prior(levels: bytes) -> str:
    return base64.b64encode(zlib.compress(levels, 9)).decode("ascii")


def decode_prior(text: str) -> bytes:
    """The levels of `fusekit.codec_prior`; their count and range are checked by the Rust decoder."""
    try:
        return zlib.decompress(base64.b64decode(text, validate=True))
    except (ValueError, zlib.error) as exc:
        raise StoreError(f"codec prior cannot be read ({exc}); the shard is damaged") from None


def shard_codec(meta: dict[str, str]) -> tuple[np.ndarray, bytes | None]:
    """(rank table, codec prior or None for fresh models) from a shard's Parquet key-value metadata."""
    codec = meta.get("fusekit.codec")
    if codec not in READABLE_CODECS:
        raise StoreError(f"shard uses codec {codec!r}; this fusekit reads {', '.join(map(repr, READABLE_CODECS))}")
    table = decode_rank_table(meta.get("fusekit.rank_table", ""))
    if codec == FRESH_CODEC:
        return table, None
    if "fusekit.codec_prior" not in meta:
        raise StoreError(f"shard of codec {codec!r} lacks its fusekit.codec_prior; the shard is damaged")
    return table, decode_prior(meta["fusekit.codec_prior"])
