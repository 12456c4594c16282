"""The extraction store's reader: per model, per window, the top-k next-token distribution, compactly.

Layout (the shared sharded layout of `shards.py`):

    DIR/manifest.json                  format "fusekit.extract", settings, shard summary
    DIR/vocab.json                     the model's normalised vocabulary (alignment needs no tokenizer)
    DIR/tokens.json                    what each id is (byte-fallback, special, empty) and the EOS id
    DIR/part-00000-of-00004.parquet    one row per window, texts shard_slice(n_texts, i, N)
    DIR/part-00000-of-00004.parquet.json  sidecar: rows, tokens, sha256, compression KL, CE histogram

A shard's rows and payload codec are `extract_codec.py`'s; the names, codecs and the per-shard codec
metadata (rank table, prior) are `extract_format.py`'s; the writer is the extraction stage
(`fusekit/extract/`). Stores of every codec in READABLE_CODECS are read.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from fusekit.store.errors import StoreError
from fusekit.store.extract_codec import decode_frame
from fusekit.store.extract_format import FORMAT, READABLE_CODECS, TOKENS_FILE, VOCAB_FILE, shard_codec
from fusekit.store.shards import (
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

_DECODE_CHUNK = 256  # windows decoded per call (bounded memory, parallel decode)


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
