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
    """The numbers of `_leb128`, decoded with numpy (a shard's table holds one number per vocabulary id)."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size and b[-1] & 0x80:
        raise StoreError("rank table ends mid-number (damaged file)")
    ends = np.flatnonzero((b & 0x80) == 0)  # the last byte of each number
    if not ends.size:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, ends[:-1] + 1]
    place = np.arange(b.size) - np.repeat(starts, ends - starts + 1)  # each byte's place in its number
    if place.max() > 8:
        raise StoreError("rank table holds a number too large for a token id (damaged file)")
    return np.add.reduceat((b & 0x7F).astype(np.int64) << (7 * place), starts)


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
