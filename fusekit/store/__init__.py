"""The stores: what the stages write to disk and read back, and the in-memory records they hold.

This package owns the on-disk formats and nothing that computes them. From the bottom up:

    errors.py          StoreError, the one error every store raises
    types.py           the records that move between stages (Window, Candidate, AlignedWindow)
    atomic.py          writes a kill cannot tear (temporary name, fsync, rename); fixed Parquet bytes
    lock.py            ShardLock: one writer per shard
    shards.py          the layout every store shares: shard names, manifest, sidecars, resume rule, verify
    extract_format.py  the extraction store's names, codecs and per-shard codec metadata
    extract_codec.py   one extraction shard: windows ⇄ rows and metadata (the Rust codec)
    extract_store.py   ExtractStore, the extraction store's reader
    extract_summary.py totals over an extraction store's sidecars (CE quantiles, KL, bytes/token)
    aligned_format.py  the aligned store's rows, columns and writer
    aligned_store.py   AlignedStore, its reader

The stages that fill the stores (`fusekit.extract`, `fusekit.align`) sit above this package.
"""

from fusekit.store.aligned_store import AlignedStore
from fusekit.store.errors import StoreError
from fusekit.store.extract_store import ExtractStore
from fusekit.store.types import AlignedWindow, Candidate, Window

__all__ = ["AlignedStore", "AlignedWindow", "Candidate", "ExtractStore", "StoreError", "Window"]
