"""The extraction stores `fusekit align` reads: opening them, checking they belong together, reading
them side by side text by text (`joined_texts`), and one model's tokens of one whole text
(`ExtractedText`, its windows concatenated).

Extraction tokenised each text once and cut the tokens into consecutive windows; alignment works on the
text, so the windows of one text are put back together here before any method looks at them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from fusekit.align.recall import perfect_source_topk
from fusekit.store.errors import StoreError
from fusekit.store.types import Window

if TYPE_CHECKING:  # pragma: no cover
    from fusekit.vocab.info import VocabInfo


StoreRef = Any  # a folder (str / Path) or an object with the ExtractStore interface


def open_extract(ref: StoreRef, role: str, threads: int | None = None):
    """An ExtractStore for a folder; objects with the interface are used as they are."""
    if isinstance(ref, (str, Path)):
        path = Path(ref)
        if not path.exists():
            raise StoreError(f"{role} store {path} does not exist: run `fusekit extract` for it first, or check the path")
        from fusekit.store.extract_store import ExtractStore

        return ExtractStore(path, threads=threads)
    return ref


def info_of(store) -> "VocabInfo":
    """The store's `VocabInfo` (objects with the ExtractStore interface but without one: guessed)."""
    info = getattr(store, "vocab_info", None)
    if info is None:
        from fusekit.vocab.info import VocabInfo

        info = VocabInfo.guess(list(store.vocab), getattr(store, "scheme", None))
        try:
            store.vocab_info = info
        except AttributeError:
            pass
    return info


def describe(ref: StoreRef) -> str:
    """How messages name a store: its folder, else the object's `folder` or type name."""
    return str(ref) if isinstance(ref, (str, Path)) else getattr(ref, "folder", type(ref).__name__)


def check_stores(target, sources: Sequence, refs: Sequence[StoreRef]) -> None:
    """Refuse incomplete stores and stores of other corpora, naming the store and what to do."""
    if not sources:
        raise StoreError("give at least one --source store to align onto the target")
    for store, ref, role in zip([target, *sources], refs, ["target", *[f"source {i + 1}" for i in range(len(sources))]]):
        if not store.complete():
            raise StoreError(
                f"the {role} store {describe(ref)} is incomplete (some shards are missing): finish "
                "`fusekit extract` for it (re-run it, or run the missing --shard I/N jobs) before aligning"
            )
    for i, (store, ref) in enumerate(zip(sources, refs[1:])):
        if store.corpus_fingerprint != target.corpus_fingerprint:
            raise StoreError(
                f"source {i + 1} ({describe(ref)}) was extracted from another corpus than the target "
                f"({describe(refs[0])}): corpus fingerprints {store.corpus_fingerprint[:12]}… vs "
                f"{target.corpus_fingerprint[:12]}…; extract every model from the same corpus (same file, field and limits)"
            )
        if store.n_texts != target.n_texts:
            raise StoreError(
                f"source {i + 1} ({describe(ref)}) holds {store.n_texts} texts, the target {target.n_texts}: "
                "the stores' texts cannot be matched by text id; extract them again from the same corpus"
            )


@dataclass
class ExtractedText:
    """One model's extraction of one whole text: its windows concatenated, as the candidates read them.

    The source side of every method, and the target side of the byte-span transfer. `span` finds the
    tokens that start inside a target window's characters (the 1:1 carry aligns a window at a time)."""

    ids: np.ndarray  # int64 [m]
    offsets: np.ndarray  # int64 [m]
    topk_ids: np.ndarray  # int64 [m, k]
    topk_logp: np.ndarray  # float32 [m, k]
    ce: np.ndarray  # float32 [m]
    metric: np.ndarray  # bool [m]: positions counted in the mean CE (finite CE, next token is a loss token)
    ordered: bool
    text: str | None = None  # the whole text as this model saw it (None: a store without texts)

    @classmethod
    def of(cls, windows: Sequence[Window], k: int) -> "ExtractedText":
        if not windows:
            z = np.zeros(0, dtype=np.int64)
            return cls(z, z, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32), np.zeros(0, bool), True)
        ids = np.concatenate([np.asarray(w.input_ids, dtype=np.int64) for w in windows])
        offsets = np.concatenate([np.asarray(w.offsets, dtype=np.int64) for w in windows])
        ce = np.concatenate([np.asarray(w.ce, dtype=np.float32) for w in windows])
        metric = np.isfinite(ce)
        if any(w.loss_mask is not None for w in windows):
            mask = np.concatenate([np.asarray(w.loss_mask, dtype=bool) if w.loss_mask is not None else np.ones(len(w.input_ids), bool) for w in windows])
            # Position t predicts token t+1: it counts where t+1 is a loss token.
            metric[:-1] &= mask[1:]
        return cls(
            ids=ids,
            offsets=offsets,
            topk_ids=np.concatenate([np.asarray(w.topk_ids, dtype=np.int64) for w in windows]),
            topk_logp=np.concatenate([np.asarray(w.topk_logp, dtype=np.float32) for w in windows]),
            ce=ce,
            metric=metric,
            ordered=bool(np.all(np.diff(offsets) >= 0)),
            text=None if any(w.text is None for w in windows) else "".join(w.text for w in windows),
        )

    def perfect(self, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A perfect source's top-k over these tokens (perfect-source recall in the report), made once."""
        cached = getattr(self, "_perfect", None)
        if cached is None:
            cached = perfect_source_topk(self.ids, self.topk_ids.shape[1], vocab_size, seed)
            self._perfect = cached
        return cached

    def span(self, char_start: int, char_end: int) -> np.ndarray | slice:
        """Indices of the tokens whose start offset lies in [char_start, char_end)."""
        if self.ordered:
            lo = int(np.searchsorted(self.offsets, char_start, side="left"))
            hi = int(np.searchsorted(self.offsets, char_end, side="left"))
            return slice(lo, hi)
        return np.flatnonzero((self.offsets >= char_start) & (self.offsets < char_end))


# (text id, the target's windows, each source's windows) of one text.
JoinedText = tuple[int, list[Window], list[list[Window]]]


def _texts_in(store, texts: range, role: str) -> Iterator[tuple[int, list[Window]]]:
    """The store's texts in `texts`, checked to lie in the range and to come in ascending order."""
    last = -1
    for text_id, windows in store.iter_texts(texts):
        text_id = int(text_id)
        if text_id not in texts:
            raise StoreError(f"the {role} store returned text {text_id} outside the requested texts {texts.start}..{texts.stop - 1}")
        if text_id <= last:
            raise StoreError(f"the {role} store returned text {text_id} after text {last}: texts must come in ascending order")
        last = text_id
        yield text_id, list(windows)


def joined_texts(target, sources: Sequence, texts: range) -> Iterator[JoinedText]:
    """Every text of `texts` the target holds, with each source's windows of it ([] where a source has
    none), reading all stores once, side by side, in text order."""
    readers = [_texts_in(s, texts, f"source {i + 1}") for i, s in enumerate(sources)]
    heads = [next(r, None) for r in readers]
    for text_id, windows in _texts_in(target, texts, "target"):
        per_source = []
        for i, reader in enumerate(readers):
            while heads[i] is not None and heads[i][0] < text_id:
                heads[i] = next(reader, None)  # a text the target does not hold
            if heads[i] is not None and heads[i][0] == text_id:
                per_source.append(heads[i][1])
                heads[i] = next(reader, None)
            else:
                per_source.append([])
        if windows:
            yield text_id, windows, per_source
    for head, reader in zip(heads, readers):  # the rest is still checked, as a whole read would check it
        if head is not None:
            for _ in reader:
                pass
