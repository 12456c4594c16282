"""Source → target vocabulary maps: FuseLLM's rule, built once per tokenizer pair and cached on disk.

MinED over a whole vocabulary is the one expensive step that does not depend on the corpus (seconds in
the Rust core for 50k × 32k, ~30 CPU-minutes in the reference code), so a map is kept in a cache folder
under a key made of both tokenizers' fingerprints and the two vocabulary sizes (a model whose embedding
is padded past its tokenizer has more ids than the tokenizer). The file also records a digest of both
normalised vocabularies: an entry whose digest differs (a fingerprint reused for another vocabulary, or
a change in the normalisation) is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fusekit.align.tokens import VocabMapStats, map_vocab_with_stats
from fusekit.store.atomic import write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.vocab.info import VocabInfo, map_specials_by_role

CACHE_FORMAT = 3  # 2: byte-fallback twins, special and empty ids are never targets (vocab/info.py); 3: end of turn by role


@dataclass(frozen=True)
class VocabMap:
    """A source→target id map with what it is made of."""

    ids: np.ndarray  # int64 [source vocab]: target id of every source id
    exact: np.ndarray  # bool [source vocab]: the target token has the identical (normalised) string
    stats: VocabMapStats
    key: str
    detail: dict = field(default_factory=dict)  # method-specific figures for the report (fusechat: its counts)

    def as_json(self) -> dict:
        total = self.stats.exact + self.stats.min_ed
        return {
            "exact": self.stats.exact,
            "min_ed": self.stats.min_ed,
            "exact_share": self.stats.exact / total if total else 0.0,
            "min_ed_share": self.stats.min_ed / total if total else 0.0,
            "cache_key": self.key,
            **self.detail,
        }


def default_cache_dir() -> Path:
    """$FUSEKIT_CACHE/vocab-maps, else $XDG_CACHE_HOME/fusekit/vocab-maps, else ~/.cache/fusekit/vocab-maps."""
    from fusekit.models.gguf_tokenizer import cache_root

    return cache_root() / "vocab-maps"


def vocab_digest(vocab: Sequence[str]) -> str:
    h = hashlib.sha256()
    for tok in vocab:
        h.update(tok.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def pair_digest(source: VocabInfo, target: VocabInfo) -> str:
    """Digest of both normalised vocabularies and their kinds: what a pair's alignment counts
    (`statmap.AlignmentCounts`) may be applied to."""
    spec = vocab_digest(source.strings) + vocab_digest(target.strings) + json.dumps([source.as_json(), target.as_json()])
    return hashlib.sha256(spec.encode()).hexdigest()


def cache_key(src_fingerprint: str, tgt_fingerprint: str, src_size: int, tgt_size: int) -> str:
    spec = json.dumps([CACHE_FORMAT, src_fingerprint, tgt_fingerprint, src_size, tgt_size])
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:32]


def _exact_flags(ids: np.ndarray, src_vocab: Sequence[str], tgt_vocab: Sequence[str]) -> np.ndarray:
    return np.fromiter((t >= 0 and tgt_vocab[t] == s for s, t in zip(src_vocab, ids.tolist())), dtype=bool, count=len(src_vocab))


def _load(path: Path, digest: str, n_src: int) -> tuple[np.ndarray, VocabMapStats] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            ids = np.asarray(data["ids"], dtype=np.int64)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # unreadable or partial: rebuild
    if meta.get("digest") != digest or ids.shape != (n_src,):
        return None
    return ids, VocabMapStats(exact=int(meta["exact"]), min_ed=int(meta["min_ed"]))


def _save(path: Path, ids: np.ndarray, stats: VocabMapStats, digest: str) -> None:
    meta = json.dumps({"digest": digest, "exact": stats.exact, "min_ed": stats.min_ed, "format": CACHE_FORMAT})
    buf = io.BytesIO()
    np.savez(buf, ids=ids.astype(np.int32), meta=np.array(meta))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(buf.getvalue(), path)
    except (OSError, StoreError):
        pass  # a read-only cache only costs the rebuild next time


def exact_map(src: VocabInfo, tgt: VocabInfo) -> VocabMap:
    """Identical-string matches only (−1 elsewhere): the byte-span transfer needs no MinED map, only its
    counts for the report. Twins, special and empty ids are neither matched nor counted."""
    lookup: dict[str, int] = {}
    for i, (text, ok) in enumerate(zip(tgt.strings, tgt.usable.tolist())):
        if ok:
            lookup.setdefault(text, i)
    ids = np.fromiter((lookup.get(t, -1) if ok else -1 for t, ok in zip(src.strings, src.usable.tolist())), np.int64, len(src))
    exact = ids >= 0
    n_usable = int(src.usable.sum())
    return VocabMap(ids=ids, exact=exact, stats=VocabMapStats(exact=int(exact.sum()), min_ed=n_usable - int(exact.sum())), key="exact")


def fusellm_vocab_map(source: VocabInfo, target: VocabInfo, threads: int | None = None) -> np.ndarray:
    """FuseLLM's vocabulary map (identical string, else MinED), int64 [V_s], −1 = no target (dropped).

    Fixed against the reference: targets that the tokenizer never emits for their text (byte-fallback
    twins), special and empty ids are never chosen; a source special token maps by role (end of sequence
    to end of sequence, end of turn to end of turn, each falling back on the other) or not at all; a padded
    source id maps nowhere.
    """
    ids, _ = map_vocab_with_stats(source.strings, target.strings, threads, tgt_usable=target.usable.tolist())
    return map_specials_by_role(np.asarray(ids, dtype=np.int64), source, target)


def vocab_map(
    src_vocab: Sequence[str],
    tgt_vocab: Sequence[str],
    src_fingerprint: str,
    tgt_fingerprint: str,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    src_info: VocabInfo | None = None,
    tgt_info: VocabInfo | None = None,
) -> VocabMap:
    """The map of `src_vocab` onto `tgt_vocab` (identical string, else MinED), from the cache when present.

    With the vocabularies' `VocabInfo`, the map is FuseLLM's with its bugs fixed (`fusellm_vocab_map`):
    no mass on byte-fallback twins, special or empty target ids; source specials by role.
    """
    if not tgt_vocab:
        raise StoreError("the target vocabulary is empty: nothing to map the sources onto")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(src_fingerprint, tgt_fingerprint, len(src_vocab), len(tgt_vocab))
    path = folder / f"{key}.npz"
    digest = hashlib.sha256((vocab_digest(src_vocab) + vocab_digest(tgt_vocab)).encode()).hexdigest()
    if src_info is not None and tgt_info is not None:
        digest = hashlib.sha256((digest + json.dumps([src_info.as_json(), tgt_info.as_json()])).encode()).hexdigest()
    cached = _load(path, digest, len(src_vocab)) if path.is_file() else None
    if cached is None:
        if src_info is not None and tgt_info is not None:
            ids = fusellm_vocab_map(src_info, tgt_info, threads)
            exact = _exact_flags(ids, src_vocab, tgt_vocab) & src_info.usable
            stats = VocabMapStats(exact=int(exact.sum()), min_ed=int(src_info.usable.sum()) - int(exact.sum()))
        else:
            ids, stats = map_vocab_with_stats(list(src_vocab), list(tgt_vocab), threads)
            ids = np.asarray(ids, dtype=np.int64)
        _save(path, ids, stats, digest)
    else:
        ids, stats = cached
    return VocabMap(ids=ids, exact=_exact_flags(ids, src_vocab, tgt_vocab), stats=stats, key=key)
