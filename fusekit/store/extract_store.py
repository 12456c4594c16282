"""The extraction store: per model, per window, the top-k next-token distribution, compactly.

Layout (the shared sharded layout of `shards.py`):

    DIR/manifest.json                  format "fusekit.extract", settings, shard summary
    DIR/vocab.json                     the model's normalised vocabulary (alignment needs no tokenizer)
    DIR/part-00000-of-00004.parquet    one row per window, texts shard_slice(n_texts, i, N)
    DIR/part-00000-of-00004.parquet.json  sidecar: rows, tokens, sha256, compression KL, CE histogram

A shard's rows are (text_id, window, char_start, char_end, n_tokens, mean_ce, has_mask, payload). The
payload is one window coded by the Rust codec (`rust/src/codec.rs`, "topk-rc/2"): input tokens,
offsets, top-k ids and quantised log-probs, CE, loss mask, all through an adaptive range coder. Ids are
coded as *ranks* in a per-shard table (ids sorted by how often they occur in the shard), which the
file's key-value metadata carries (`fusekit.rank_table`: base64 of zlib-compressed LEB128 ids in
rank order). Every window's coder starts from the shard's prior (`fusekit.codec_prior`: base64 of the
zlib-compressed levels `codec_train_prior` learnt from the shard's windows), so short texts cost no
more per token than long ones and any window still decodes on its own. Stores of "topk-rc/1" (fresh
models in every window, no prior) are still read.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl

import fusekit._core as _core
from fusekit.corpus import corpus_fingerprint  # noqa: F401  (re-exported for the align stage)
from fusekit.store.shards import (
    StoreError,
    complete_shards,
    edited_manifest_error,
    foreign_sidecars,
    read_manifest,
    settings_digest,
    sha256_file,
    shard_count,
    shard_filename,
    shard_slice,
)
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
_DECODE_CHUNK = 256  # windows decoded per call (bounded memory, parallel decode)
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


# ---------------------------------------------------------------------------------------------
# Writing


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


# ---------------------------------------------------------------------------------------------
# Reading


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


class ExtractStore:
    """Read an extraction store: settings, vocabulary, and windows by text id.

    Raises StoreError when `folder` is missing, is not an extraction store, or has no complete shard.
    Shards are checked against their sha256 when read.
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"no extraction store at {self.folder} (run `fusekit extract --out {self.folder}` first)")
        self.manifest: dict = read_manifest(self.folder)
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.folder} holds a {self.manifest.get('format')!r} store, not an extraction store")
        self.settings: dict = self.manifest.get("settings", {})
        self.threads = threads
        try:
            self.k: int = int(self.settings["k"])
            self.n_texts: int = int(self.settings["n_texts"])
            self.num_shards: int = shard_count(self.folder, self.settings)
            self.step: float = float(self.settings["codec_step"])
            self.knee: float = float(self.settings["codec_knee"])
            self.tokenizer_fingerprint: str = self.settings["tokenizer_fingerprint"]
            self.corpus_fingerprint: str = self.settings["corpus_fingerprint"]
            self.scheme: str = self.settings["scheme"]
            self.vocab_size: int = int(self.settings["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.folder / 'manifest.json'} lacks setting {exc}; the store is damaged") from None
        if self.settings.get("codec") not in READABLE_CODECS:
            raise StoreError(
                f"{self.folder} uses codec {self.settings.get('codec')!r}; this fusekit reads {', '.join(map(repr, READABLE_CODECS))}"
            )
        self._digest = settings_digest(self.settings)
        self._sidecars = {
            name: info for name, info in complete_shards(self.folder).items() if info.get("sha256") and self._owns(name)
        }
        if not self._sidecars:
            foreign = foreign_sidecars(self.folder)
            if foreign:
                raise edited_manifest_error(self.folder, foreign)
            raise StoreError(f"{self.folder} has no complete shard yet (extraction not finished: re-run `fusekit extract`)")
        self.vocab: list[str] = self._read_vocab()
        self.vocab_info = self._read_vocab_info()
        self._verified: set[str] = set()

    def _read_vocab_info(self):
        """What each id is (tokens.json); stores written before it existed get it guessed from spellings."""
        from fusekit.vocab.info import VocabInfo

        path = self.folder / TOKENS_FILE
        if not path.is_file():
            return VocabInfo.guess(self.vocab, self.scheme)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}; re-run `fusekit extract` into this folder to rewrite it") from None
        return VocabInfo.from_json(self.vocab, data)

    def _owns(self, name: str) -> bool:
        return name in {shard_filename(i, self.num_shards) for i in range(self.num_shards)}

    def _read_vocab(self) -> list[str]:
        path = self.folder / VOCAB_FILE
        try:
            data = path.read_bytes()
        except OSError:
            raise StoreError(f"{path} is missing; the store is damaged (re-run extraction into a new folder)") from None
        if hashlib.sha256(data).hexdigest() != self.manifest.get("vocab_sha256"):
            raise StoreError(f"{path}: sha256 differs from manifest.json (the file is corrupt or was changed)")
        vocab = json.loads(data.decode("utf-8"))
        if not isinstance(vocab, list) or len(vocab) != self.vocab_size:
            raise StoreError(f"{path} does not hold {self.vocab_size} token strings")
        return vocab

    # -- shards

    def shard_ranges(self) -> list[tuple[str, range, bool]]:
        """(filename, the text ids it holds, complete?) for every shard of the run."""
        return [
            (shard_filename(i, self.num_shards), shard_slice(self.n_texts, i, self.num_shards), shard_filename(i, self.num_shards) in self._sidecars)
            for i in range(self.num_shards)
        ]

    def complete(self) -> bool:
        """Every shard of the run is present (False when some are still missing).

        Raises StoreError naming the file when a present shard's sha256 differs from its sidecar's: a
        corrupt shard is not a missing one.
        """
        for name, info in self._sidecars.items():
            if name not in self._verified:
                if sha256_file(self.folder / name) != info.get("sha256"):
                    raise StoreError(
                        f"{self.folder / name}: sha256 mismatch (the shard is corrupt or was changed; delete it and re-run extraction)"
                    )
                self._verified.add(name)
        return len(self._sidecars) == self.num_shards

    def sidecar(self, filename: str) -> dict:
        return self._sidecars[filename]

    def _load(self, name: str) -> tuple[pl.DataFrame, np.ndarray, bytes | None]:
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != self._sidecars[name].get("sha256"):
            raise StoreError(f"{path}: sha256 mismatch (the shard is corrupt or was changed; delete it and re-run extraction)")
        self._verified.add(name)
        try:
            meta = pl.read_parquet_metadata(io.BytesIO(data))
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # polars' own error types
            raise StoreError(f"{path} cannot be read as Parquet ({exc})") from None
        if meta.get("fusekit.settings_sha256") != self._digest:
            raise StoreError(f"{path} belongs to another extraction run (its settings differ from manifest.json)")
        try:
            table, prior = shard_codec(meta)
        except StoreError as exc:
            raise StoreError(f"{path}: {exc}") from None
        return frame, table, prior

    # -- windows

    def iter_texts(self, text_ids: range | None = None) -> Iterator[tuple[int, list[Window]]]:
        """(text id, its windows in order) for the texts in `text_ids` (default: all), in text order.

        Texts with no tokens are skipped. A text whose shard is not extracted yet is an error.
        """
        wanted = range(self.n_texts) if text_ids is None else text_ids
        if wanted.step != 1:
            raise StoreError("iter_texts takes a contiguous range of text ids")
        for name, held, done in self.shard_ranges():
            lo, hi = max(held.start, wanted.start), min(held.stop, wanted.stop)
            if lo >= hi:
                continue
            if not done:
                raise StoreError(
                    f"{self.folder / name} (texts {held.start}..{held.stop - 1}) is not extracted yet; "
                    f"run `fusekit extract` with --shard {name[5:10].lstrip('0') or '0'}/{self.num_shards}"
                )
            frame, table, prior = self._load(name)
            frame = frame.filter((pl.col("text_id") >= lo) & (pl.col("text_id") < hi))
            current, group = None, []
            for start in range(0, frame.height, _DECODE_CHUNK):
                try:
                    chunk = decode_frame(frame.slice(start, _DECODE_CHUNK), table, self.k, self.step, self.knee, self.threads, prior)
                except StoreError as exc:
                    raise StoreError(f"{self.folder / name}: {exc}") from None
                for w in chunk:
                    if w.text_id != current and group:
                        yield current, group
                        group = []
                    current = w.text_id
                    group.append(w)
            if group:
                yield current, group

    def iter_windows(self) -> Iterator[Window]:
        for _, windows in self.iter_texts():
            yield from windows

    def window_count(self) -> int:
        return sum(int(info.get("windows", info.get("rows", 0))) for info in self._sidecars.values())

    def token_count(self) -> int:
        return sum(int(info.get("tokens", 0)) for info in self._sidecars.values())


def summarize(sidecars: Sequence[dict]) -> dict:
    """Totals over shards' sidecars: tokens, bytes/token, compression KL, kept mass, CE quantiles."""
    tokens = sum(int(s.get("tokens", 0)) for s in sidecars)
    predicted = sum(int(s.get("predicted", 0)) for s in sidecars)
    file_bytes = sum(int(s.get("bytes", 0)) for s in sidecars)
    payload = sum(int(s.get("payload_bytes", 0)) for s in sidecars)
    hist = np.zeros(CE_BINS, dtype=np.int64)
    for s in sidecars:
        hist += np.asarray(s.get("ce_hist") or [0] * CE_BINS, dtype=np.int64)
    out = {
        "shards": len(sidecars),
        "windows": sum(int(s.get("windows", 0)) for s in sidecars),
        "tokens": tokens,
        "bytes": file_bytes,
        "bytes_per_token": file_bytes / tokens if tokens else math.nan,
        "payload_bytes_per_token": payload / tokens if tokens else math.nan,
        "kl_mean": sum(float(s.get("kl_sum", 0.0)) for s in sidecars) / tokens if tokens else math.nan,
        "kl_max": max((float(s.get("kl_max", 0.0)) for s in sidecars), default=math.nan),
        "mass_mean": sum(float(s.get("mass_sum", 0.0)) for s in sidecars) / tokens if tokens else math.nan,
        "ce_mean": sum(float(s.get("ce_sum", 0.0)) for s in sidecars) / predicted if predicted else math.nan,
        "ce_hist": hist.tolist(),
    }
    out["ce_quantiles"] = {q: histogram_quantile(hist, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    return out


def histogram_quantile(hist: np.ndarray, q: float) -> float:
    """The q-quantile of the CE histogram, linear within a bin."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    target = q * total
    cum = 0
    for i, c in enumerate(hist.tolist()):
        if c and cum + c >= target:
            return (i + (target - cum) / c) * CE_BIN
        cum += c
    return CE_BINS * CE_BIN
