"""Where the trainer's windows come from: an aligned store folder, a store object or windows in memory,
read by index (`WindowSource`), checked against the target model before any step (`check_target`) and
against the loss (`missing_mass`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from fusekit.store.types import AlignedWindow
from fusekit.train.examples import TrainDataError
from fusekit.train.feed import cores_per_rank, store_windows
from fusekit.train.shuffle import BUFFER_GROUPS


class WindowSource:
    """Windows by index. Random access (`get`) for lists and stores that offer it; otherwise a
    forward-only reader that restarts when asked for an earlier index. A store that reads whole row
    groups (`group_bounds`, `read_group`: the aligned store) is read a row group at a time."""

    def __init__(self, windows: Sequence[AlignedWindow] | None = None, store=None):
        self._windows = windows
        self._store = store
        self._iter: Iterator[AlignedWindow] | None = None
        self._cursor = -1
        self._current: AlignedWindow | None = None
        self._lengths: np.ndarray | None = None

    @property
    def random_access(self) -> bool:
        if self._windows is not None:
            return True
        return hasattr(self._store, "__getitem__") and hasattr(self._store, "__len__")

    @property
    def folder(self) -> Path | None:
        """The store folder that worker processes can open (None: windows in memory, or another store)."""
        return getattr(self._store, "folder", None) if self.groups() is not None else None

    def groups(self) -> np.ndarray | None:
        """Row groups as window ranges (`AlignedStore.group_bounds`); None when windows are read one by one."""
        if self._windows is None and callable(getattr(self._store, "group_bounds", None)) and callable(getattr(self._store, "read_group", None)):
            return np.asarray(self._store.group_bounds(), dtype=np.int64)
        return None

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            if self._windows is not None:
                self._lengths = np.array([len(w.input_ids) for w in self._windows], dtype=np.int64)
            elif callable(getattr(self._store, "window_lengths", None)):
                self._lengths = np.asarray(self._store.window_lengths(), dtype=np.int64)
            else:
                self._lengths = np.array([len(w.input_ids) for w in self._store.iter_windows()], dtype=np.int64)
        return self._lengths

    def get(self, index: int) -> AlignedWindow:
        if self._windows is not None:
            return self._windows[index]
        if self.random_access:
            return self._store[index]
        if self._iter is None or index < self._cursor:
            self._iter, self._cursor, self._current = iter(self._store.iter_windows()), -1, None
        while self._cursor < index:
            self._current = next(self._iter)
            self._cursor += 1
        return self._current

    def read(self, start: int, stop: int, wanted: Sequence[int], candidates: bool = True) -> list[AlignedWindow]:
        """Windows `wanted` of the group [start, stop): one row-group read, or one `get` each."""
        if self.groups() is not None:
            return store_windows(self._store, start, stop, wanted, candidates)
        return [self.get(int(w)) for w in wanted]


def default_workers(source: WindowSource) -> int:
    """Loader processes per rank when the user sets none: 0 for windows in memory or a store of fewer
    than two buffers of row groups (a process start costs more than it saves), else one per spare core
    of this rank's share of the machine (torchrun's LOCAL_WORLD_SIZE ranks per node), 1 to 4."""
    bounds = source.groups()
    if bounds is None or len(bounds) - 1 < 2 * BUFFER_GROUPS:
        return 0
    return max(1, min(4, cores_per_rank() - 1))


def open_source(aligned: str | Path | Iterable[AlignedWindow]) -> WindowSource:
    """An aligned store folder, an object with `iter_windows()`, or any iterable of AlignedWindows."""
    if isinstance(aligned, (str, Path)):
        path = Path(aligned)
        if not path.exists():
            raise TrainDataError(f"no aligned store at {path}: run `fusekit align` first, or check the path")
        from fusekit.store.aligned_store import AlignedStore

        return WindowSource(store=AlignedStore(path))
    if hasattr(aligned, "iter_windows"):
        return WindowSource(store=aligned)
    windows = list(aligned)
    bad = next((w for w in windows if not isinstance(w, AlignedWindow)), None)
    if bad is not None:
        raise TrainDataError(f"expected AlignedWindow objects, got {type(bad).__name__}")
    return WindowSource(windows=windows)


def check_target(source: WindowSource, tokenizer, config, model_ref: str) -> None:
    """Refuse an aligned store built for another target model, before any training step.

    The aligned manifest records the target's tokenizer fingerprint and vocabulary size
    (`settings.target`); `config` is the model's (its logits count) and `tokenizer` the model's own
    (None for a weights-only folder: then only the vocabulary size is compared). Windows given in
    memory carry no manifest and are not checked. Raises TrainDataError naming both.
    """
    store = getattr(source, "_store", None)
    settings = getattr(store, "settings", None)
    target = settings.get("target") if isinstance(settings, dict) else None
    if not isinstance(target, dict):
        return
    from fusekit.models.identity import logit_size, tokenizer_fingerprint

    folder = getattr(store, "folder", "the aligned store")
    built_for = target.get("model") or "another model"
    size, want = logit_size(config), target.get("vocab_size")
    if want is not None and int(want) != size:
        raise TrainDataError(
            f"{folder} was aligned for {built_for} (vocabulary of {want} tokens), but {model_ref} predicts {size}: "
            "train the model whose extraction store was the --target of `fusekit align`, or align again for this one"
        )
    want_fp = target.get("tokenizer_fingerprint")
    if tokenizer is not None and want_fp and getattr(tokenizer, "backend_tokenizer", None) is not None:
        if tokenizer_fingerprint(tokenizer) != want_fp:
            raise TrainDataError(
                f"{folder} was aligned for {built_for}, whose tokenizer differs from {model_ref}'s (same vocabulary size, "
                "other tokens): train the model whose extraction store was the --target of `fusekit align`, or align again for this one"
            )


def missing_mass(source: WindowSource, loss: str, uses_target: bool) -> str | None:
    """The warning for a divergence loss on an aligned store that records no teacher mass (format version 2,
    before `c{c}_mass`), else None. Such a store trains as before version 3 — every teacher whole on its
    kept ids, a rest bucket of 0 — so `kl` equals `ce` and `reverse_kl` leans on its floor."""
    store = getattr(source, "_store", None)
    if loss == "ce" or not uses_target or getattr(store, "has_mass", True):
        return None
    version = store.settings.get("format_version") if isinstance(getattr(store, "settings", None), dict) else None
    return (
        f"{getattr(store, 'folder', 'the aligned store')} (aligned store format {version}) records no teacher mass outside "
        f"the top-k, so --loss {loss} takes every teacher's rest bucket as 0 (kl trains like ce): run `fusekit align` "
        "again (same inputs, a new --out) to write format 3 with each candidate's kept mass"
    )
