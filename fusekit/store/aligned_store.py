"""The aligned store's reader: windows by index, row groups, or in order (the layout: `aligned_format.py`).

Format versions 2 and 3 are read alike; a version-2 store's candidates have no mass (`Candidate.mass`
None, `has_mass` False): fusion reads that as 1 on every row that holds probability.

Opening a store does not hash it: each shard's sha256 was checked when it was written (or by
`fusekit inspect`), and a shard edited since then is newer than its sidecar, which the reader sees from
file times alone and answers by hashing that shard (`shards.shard_is_stamped`): start-up costs the same
for a store of any size, and an edited shard is refused, named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl

from fusekit.store.errors import StoreError
from fusekit.store.shards import (
    complete_shards,
    edited_manifest_error,
    foreign_sidecars,
    read_manifest,
    sha256_file,
    shard_count,
    shard_filename,
    shard_is_stamped,
    stamp_shard,
)
from fusekit.store.aligned_format import FORMAT, REPORT, WINDOW_COLUMNS, candidate_columns, has_mass
from fusekit.store.types import AlignedWindow, Candidate


@dataclass
class _Flat:
    values: np.ndarray
    starts: np.ndarray  # per row, into values

    @classmethod
    def of(cls, col: pl.Series) -> "_Flat":
        lens = col.list.len().to_numpy().astype(np.int64)
        starts = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        return cls(col.explode(empty_as_null=False).to_numpy(), starts)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.starts[i] : self.starts[i + 1]]




def _normalised(probs: np.ndarray, k: int) -> np.ndarray:
    """float16 probabilities [positions · k] → float32 [positions, k], each row renormalised to sum 1
    (float16 rounding leaves rows a few 1e-4 off 1; fusion expects exact distributions); done once per
    decoded block, not per window."""
    p = probs.astype(np.float32).reshape(-1, k)
    total = p[:, 0].copy()
    for j in range(1, k):  # k column adds: several times faster than a sum over a short last axis
        total += p[:, j]
    total[total == 0] = 1.0  # an empty row stays 0
    p /= total[:, None]
    return p


class _Decoded:
    """A decoded block of rows (a row group or a whole shard) as flat numpy arrays.

    A block read without the candidate columns gives windows without candidates (training on CLM alone).
    """

    def __init__(self, df: pl.DataFrame, ks: Sequence[int]):
        self.ks = list(ks)
        self.text_id = df["text_id"].to_numpy()
        self.window = df["window"].to_numpy()
        self.has_mask = df["has_mask"].to_numpy()
        self.input_ids = _Flat.of(df["input_ids"])
        self.mask = _Flat.of(df["loss_mask"])
        with_candidates = bool(self.ks) and "c0_ids" in df.columns
        self.cands = [
            (_Flat.of(df[f"c{c}_ids"]), _normalised(_Flat.of(df[f"c{c}_probs"]).values, k), _Flat.of(df[f"c{c}_ce"]), df[f"c{c}_mean_ce"].to_numpy())
            for c, k in enumerate(self.ks)
        ] if with_candidates else []
        # Version 3: each candidate's kept mass per position; a version-2 store has none (Candidate.mass None).
        self.masses = [
            _Flat.of(df[f"c{c}_mass"]) if f"c{c}_mass" in df.columns else None for c in range(len(self.ks))
        ] if with_candidates else []

    def __len__(self) -> int:
        return len(self.text_id)

    def window_at(self, i: int) -> AlignedWindow:
        ids = self.input_ids.row(i).astype(np.int64)
        n = len(ids)
        at = int(self.input_ids.starts[i])  # the window's first position; candidates hold n positions each too
        cands = []
        for k, (c_ids, c_probs, c_ce, c_mean), c_mass in zip(self.ks, self.cands, self.masses):
            cands.append(
                Candidate(
                    ids=c_ids.row(i).reshape(n, k).copy(),
                    probs=c_probs[at : at + n].copy(),
                    ce=c_ce.row(i).copy(),
                    mean_ce=float(c_mean[i]),
                    mass=None if c_mass is None else c_mass.row(i).copy(),
                )
            )
        mask = self.mask.row(i).astype(bool) if self.has_mask[i] else None
        return AlignedWindow(text_id=int(self.text_id[i]), window=int(self.window[i]), input_ids=ids, candidates=cands, loss_mask=mask)


class AlignedStore:
    """Read an aligned store folder: `len`, random access `store[i]`, `window_lengths()`, `iter_windows()`,
    and whole row groups (`group_bounds()`, `read_group(g)`).

    `check=False` skips the shard check of the module docstring (a worker process whose parent opened
    the same store a moment ago). Raises StoreError for an incomplete store, an edited manifest, or a
    shard changed since it was verified (the file named).
    """

    def __init__(self, folder: str | Path, check: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"no aligned store at {self.folder}: run `fusekit align` first, or check the path")
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.folder} holds a {self.manifest.get('format')!r} store, not an aligned store ({FORMAT!r})")
        self.settings: dict = self.manifest.get("settings", {})
        try:
            self.ks: list[int] = [int(k) for k in self.settings["ks"]]
            self.rows_per_group = int(self.settings["row_group_rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.folder / 'manifest.json'} lacks a valid setting {exc}; the store is damaged") from None
        # Version 3 on: each candidate's kept mass per position (`c{c}_mass`); see `has_mass`.
        self.has_mass = has_mass(self.settings.get("format_version"))
        self.num_shards = shard_count(self.folder, self.settings)
        done = complete_shards(self.folder)
        names = [shard_filename(i, self.num_shards) for i in range(self.num_shards)]
        missing = [i for i, name in enumerate(names) if name not in done]
        if missing and not done:
            foreign = foreign_sidecars(self.folder)
            if foreign:
                raise edited_manifest_error(self.folder, foreign)
        if missing:
            shown = ", ".join(f"{i}/{self.num_shards}" for i in missing[:8])
            raise StoreError(
                f"{self.folder} is incomplete: {len(missing)} of {self.num_shards} shards are missing ({shown}"
                f"{', …' if len(missing) > 8 else ''}); finish `fusekit align` (re-run it, or run the missing --shard I/N)"
            )
        self._files = [self.folder / name for name in names]
        if check:
            for name in names:
                self._check_shard(name, done[name].get("sha256"))
        self._rows = np.array([int(done[name]["rows"]) for name in names], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)])
        self._cached: tuple[int, int] | None = None
        self._block: _Decoded | None = None
        self._lengths: np.ndarray | None = None
        self.groups_read = 0  # row groups decoded by `read_group` (the trainer's reads), for the record

    def _check_shard(self, name: str, sha: str | None) -> None:
        """Hash a shard that changed since it was verified; refuse it, named, when its bytes differ."""
        if shard_is_stamped(self.folder, name):
            return
        path = self.folder / name
        try:
            ok = sha256_file(path) == sha
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not ok:
            raise StoreError(
                f"{path}: sha256 mismatch (the shard was changed after it was written or verified, or is corrupt; "
                "delete it and re-run `fusekit align`)"
            )
        stamp_shard(self.folder, name)

    @property
    def n_candidates(self) -> int:
        return len(self.ks)

    @property
    def report(self) -> dict | None:
        path = self.folder / REPORT
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, i: int, **scan) -> pl.DataFrame:
        """Shard i (or a slice of it: `scan` = offset, length, columns); an unreadable shard is a
        StoreError naming the file."""
        path = self._files[i]
        try:
            frame = pl.scan_parquet(path)
            if "columns" in scan:
                frame = frame.select(scan["columns"])
            if "offset" in scan:
                frame = frame.slice(scan["offset"], scan["length"])
            return frame.collect()
        except Exception as exc:  # polars' own error types
            raise StoreError(f"{path} cannot be read as Parquet ({str(exc).splitlines()[0]}); delete it and re-run `fusekit align`") from None

    def window_lengths(self) -> np.ndarray:
        """Tokens per window, in store order (reads only the `n` column)."""
        if self._lengths is None:
            parts = [self._shard(i, columns=["n"])["n"].to_numpy() for i in range(len(self._files))]
            self._lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return self._lengths

    def group_bounds(self) -> np.ndarray:
        """Row groups as store-order window ranges: group g holds windows [b[g], b[g+1]), int64 [groups + 1].

        A group never spans two shards (each shard's last group may be short).
        """
        r = self.rows_per_group
        starts = [self._starts[s] + np.arange(0, int(rows), r) for s, rows in enumerate(self._rows) if rows]
        return np.concatenate([*starts, [len(self)]]).astype(np.int64)

    def read_group(self, start: int, stop: int, candidates: bool = True) -> _Decoded:
        """Decode store-order windows [start, stop) — one row group from `group_bounds` — in one read.

        `candidates=False` reads the tokens and loss masks only (CLM training needs no fusion target).
        """
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        local = start - int(self._starts[shard])
        columns = WINDOW_COLUMNS + (candidate_columns(self.ks, self.has_mass) if candidates else [])
        df = self._shard(shard, offset=local, length=stop - start, columns=columns)
        self.groups_read += 1
        return _Decoded(df, self.ks)

    def __getitem__(self, index: int) -> AlignedWindow:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {index} is out of range: the store holds {n} windows")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        local = i - int(self._starts[shard])
        group = local // self.rows_per_group
        if self._cached != (shard, group):
            self._block = None  # drop the old block before decoding the next one
            start = group * self.rows_per_group
            df = self._shard(shard, offset=start, length=self.rows_per_group)
            self._block, self._cached = _Decoded(df, self.ks), (shard, group)
        return self._block.window_at(local - group * self.rows_per_group)

    def iter_windows(self) -> Iterator[AlignedWindow]:
        """Every window in store order, one decoded shard at a time."""
        for i in range(len(self._files)):
            block = _Decoded(self._shard(i), self.ks)
            for i in range(len(block)):
                yield block.window_at(i)
            del block


