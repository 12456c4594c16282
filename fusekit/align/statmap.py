"""FuseChat's statistical vocabulary map (method `fusechat`): each source token goes to the target token
it is most often aligned with over the corpus, instead of FuseLLM's exact/minimum-edit-distance guess.

FuseChat (Wan et al., 2024, https://arxiv.org/abs/2402.16107, "mapping statistics"; reused by
FuseChat-2.0, https://arxiv.org/abs/2408.07990) builds its source→target vocabulary map from the
sequence-level DTW token alignment of the whole training corpus (reference: fanqiwan/FuseAI,
`FuseChat/train/align_token_and_vocab.py`, `align_type="default"`). fusekit's rule, and where it differs
from the reference, is in docs/ALIGN.md ("The statistical map"):

* **Counts.** The same DTW the `fusellm` method runs (normalised strings, per target window) aligns the
  source's and the target's tokens; C[s, t] counts how often source token s and target token t *begin
  together* on the path — the pair (i, j) is the first pair of source position i and also the first of
  target position j. (The reference counts every pair on the path.) The counts are kept sparse,
  one (src, tgt, count) triple per distinct pair: never a dense V_s × V_t table.
* **Map.** s → the usable target id with the largest C[s, t]; ties go to the identical string, then to the
  lowest id. A source token never seen (or seen only beside ids that must take no mass: byte-fallback
  twins, special, empty) keeps FuseLLM's fixed exact/MinED map; special tokens map by role (EOS → EOS),
  padded ids nowhere.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fusekit.align.tokens import DTW_CHUNK, TokenTable, align_ids_batch
from fusekit.align.transfer import Method, Transferer, encode_offsets
from fusekit.align.vocab_cache import exact_map, pair_digest
from fusekit.vocab.info import EMPTY, SPECIAL, VocabInfo, map_specials_by_role, vocab_info

COUNTS_FORMAT = 1
MERGE_EVERY = 32  # chunks of counts summed at once


@dataclass(frozen=True)
class AlignmentCounts:
    """Sparse co-alignment counts of a source vocabulary (rows) against a target vocabulary (columns).

    `src`, `tgt` int32 [nnz] and `count` int64 [nnz] ≥ 1, one entry per distinct (src, tgt) pair, sorted by
    (src, tgt); `shape` = (V_s, V_t); `pair` = digest of both vocabularies (`pair_digest`, "" unknown) so
    counts are never applied to another tokenizer pair.
    """

    src: np.ndarray
    tgt: np.ndarray
    count: np.ndarray
    shape: tuple[int, int]
    pair: str = ""

    @property
    def nnz(self) -> int:
        return int(self.count.size)

    @property
    def total(self) -> int:
        """Number of aligned pairs counted."""
        return int(self.count.sum())

    @classmethod
    def empty(cls, shape: tuple[int, int], pair: str = "") -> "AlignmentCounts":
        z = np.zeros(0, np.int32)
        return cls(z, z.copy(), np.zeros(0, np.int64), (int(shape[0]), int(shape[1])), pair)

    @classmethod
    def from_pairs(cls, src_tokens: np.ndarray, tgt_tokens: np.ndarray, shape: tuple[int, int], pair: str = "") -> "AlignmentCounts":
        """Count (src_tokens[n], tgt_tokens[n]) occurrences; ids must lie in [0, V_s) × [0, V_t) (ValueError)."""
        s, t = np.asarray(src_tokens, np.int64).ravel(), np.asarray(tgt_tokens, np.int64).ravel()
        if s.shape != t.shape:
            raise ValueError(f"source and target token arrays differ in length: {s.size} vs {t.size}")
        _check_range(s, t, shape)
        keys, counts = np.unique(s * int(shape[1]) + t, return_counts=True)
        return cls._from_keys(keys, counts.astype(np.int64), shape, pair)

    @classmethod
    def _from_keys(cls, keys: np.ndarray, counts: np.ndarray, shape: tuple[int, int], pair: str) -> "AlignmentCounts":
        v_t = int(shape[1])
        return cls((keys // v_t).astype(np.int32), (keys % v_t).astype(np.int32), counts, (int(shape[0]), v_t), pair)

    def merged(self, other: "AlignmentCounts") -> "AlignmentCounts":
        """The sum of two count tables of the same tokenizer pair (exact integer sums)."""
        return AlignmentCounts.summed([self, other])

    @staticmethod
    def summed(parts: Sequence["AlignmentCounts"]) -> "AlignmentCounts":
        """The sum of count tables of one tokenizer pair, in one sort (exact integer sums)."""
        shape, pairs = parts[0].shape, {p.pair for p in parts} - {""}
        if any(p.shape != shape for p in parts) or len(pairs) > 1:
            raise ValueError("cannot add alignment counts of different tokenizer pairs")
        keys = np.concatenate([p.src.astype(np.int64) * shape[1] + p.tgt for p in parts])
        counts = np.concatenate([p.count for p in parts])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else np.zeros(0, np.int64)
        total = np.add.reduceat(counts, starts) if keys.size else counts
        return AlignmentCounts._from_keys(keys[starts], total, shape, pairs.pop() if pairs else "")

    def to_bytes(self, meta: dict) -> bytes:
        """An .npz file: the three arrays, the shape and `meta` (JSON) beside the pair digest; deterministic."""
        buf = io.BytesIO()
        info = dict(meta, format=COUNTS_FORMAT, pair=self.pair, shape=list(self.shape))
        arrays = {"src": self.src, "tgt": self.tgt, "count": self.count, "meta": np.array(json.dumps(info, sort_keys=True))}
        # np.savez's layout with a fixed date in each member: the same counts always give the same bytes
        # (they are files of the aligned store, which is byte-identical on re-run).
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: str | Path) -> tuple["AlignmentCounts", dict]:
        """(counts, meta) from an .npz written by `to_bytes`; ValueError when it is not a valid counts file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                src, tgt, count = (np.asarray(data[k]) for k in ("src", "tgt", "count"))
            shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a fusekit alignment-counts file ({exc})") from None
        if meta.get("format") != COUNTS_FORMAT or not (src.shape == tgt.shape == count.shape) or src.ndim != 1:
            raise ValueError(f"{path} is not a fusekit alignment-counts file of format {COUNTS_FORMAT}")
        _check_range(src.astype(np.int64), tgt.astype(np.int64), shape)
        return cls(src.astype(np.int32), tgt.astype(np.int32), count.astype(np.int64), shape, str(meta.get("pair", ""))), meta


def _check_range(s: np.ndarray, t: np.ndarray, shape: tuple[int, int]) -> None:
    if s.size and (s.min() < 0 or s.max() >= shape[0] or t.min() < 0 or t.max() >= shape[1]):
        raise ValueError(f"token ids outside the vocabularies {shape[0]} × {shape[1]}")


# ---------------------------------------------------------------------------------------------- counting


def co_start_pairs(path: np.ndarray, src_ids: np.ndarray, tgt_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source token ids, target token ids) of the pairs of a DTW path that begin together.

    `path` int [P, 2] of (source position, target position), non-decreasing in both (`align_ids_batch`).
    A pair counts when its source position and its target position both appear on the path for the first
    time: a diagonal step. 1:n and n:1 groups count once, for their first tokens.
    """
    path = np.asarray(path, np.int64)
    if not len(path):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = path[:, 0], path[:, 1]
    both = np.r_[True, i[1:] != i[:-1]] & np.r_[True, j[1:] != j[:-1]]
    return np.asarray(src_ids, np.int64)[i[both]], np.asarray(tgt_ids, np.int64)[j[both]]


def count_alignments(
    src_table: TokenTable,
    tgt_table: TokenTable,
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, int],
    pair: str = "",
    threads: int | None = None,
) -> AlignmentCounts:
    """Counts over many (source ids, target ids) tokenisations of the same texts: DTW on `threads` cores
    in chunks of `DTW_CHUNK`, aggregated with numpy every `MERGE_EVERY` chunks (memory stays near the
    distinct pairs)."""
    parts = [AlignmentCounts.empty(shape, pair)]
    chunk: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        live = [(np.asarray(s, np.int64), np.asarray(t, np.int64)) for s, t in chunk if len(s) and len(t)]
        chunk.clear()
        if not live:
            return
        paths = align_ids_batch(src_table, tgt_table, live, threads=threads)
        got = [co_start_pairs(p, s, t) for p, (s, t) in zip(paths, live)]
        parts.append(AlignmentCounts.from_pairs(np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]), shape, pair))
        if len(parts) >= MERGE_EVERY:  # one sort per MERGE_EVERY chunks keeps memory near the distinct pairs
            parts[:] = [AlignmentCounts.summed(parts)]

    for item in pairs:
        chunk.append(item)
        if len(chunk) >= DTW_CHUNK:
            flush()
    flush()
    return AlignmentCounts.summed(parts)


def count_texts(texts: Sequence[str], source_tokenizer: Any, target_tokenizer: Any, threads: int | None = None) -> AlignmentCounts:
    """Counts over `texts` for two tokenizers (the text-level API): each whole text tokenised by both
    (no special tokens) and aligned by DTW. Pass the result to `fusekit.transfer(…, counts=…)`."""
    s_info, t_info = vocab_info(source_tokenizer), vocab_info(target_tokenizer)
    items = ((encode_offsets(source_tokenizer, t).ids, encode_offsets(target_tokenizer, t).ids) for t in texts)
    tables = TokenTable(list(s_info.strings)), TokenTable(list(t_info.strings))
    return count_alignments(*tables, items, (len(s_info), len(t_info)), pair_digest(s_info, t_info), threads)


def statistical_vocab_map(
    counts: AlignmentCounts, source: VocabInfo, target: VocabInfo, fallback: np.ndarray, exact: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(map int64 [V_s] with −1 = nowhere, seen bool [V_s]: mapped from the counts).

    s → argmax_t C[s, t] over usable target ids, ties to the identical string, then the lowest id;
    `fallback` (FuseLLM's fixed map) where no usable pair was counted. Special source tokens by role,
    empty (padded) ids nowhere. `exact` int64 [V_s]: each source id's identical target id or −1
    (`vocab_cache.exact_map`; computed when not given). Raises ValueError on counts of another pair.
    """
    if counts.shape != (len(source), len(target)) or (counts.pair and counts.pair != pair_digest(source, target)):
        raise ValueError(
            f"these alignment counts belong to another tokenizer pair (vocabularies {counts.shape[0]} × {counts.shape[1]}, "
            f"this pair {len(source)} × {len(target)}): count over texts of this source and target"
        )
    keep = target.usable[counts.tgt]
    s, t, c = counts.src[keep].astype(np.int64), counts.tgt[keep].astype(np.int64), counts.count[keep]
    identical = (exact_map(source, target).ids if exact is None else exact)[s] == t
    order = np.lexsort((t, ~identical, -c, s))  # by source, then count down, identical first, lowest id
    s, t = s[order], t[order]
    first = np.r_[True, s[1:] != s[:-1]] if s.size else np.zeros(0, bool)
    ids = np.asarray(fallback, np.int64).copy()
    ids[s[first]] = t[first]
    seen = np.zeros(len(source), bool)
    seen[s[first]] = True
    seen[(source.kind == SPECIAL) | (source.kind == EMPTY)] = False
    return map_specials_by_role(ids, source, target), seen


def fusechat_transferer(base: Transferer, counts: AlignmentCounts) -> Transferer:
    """`base` (a `fusellm` Transferer of the pair: its tables and FuseLLM map as the fallback) carrying
    through the statistical map of `counts`."""
    ids, _ = statistical_vocab_map(counts, base.source, base.target, base.vocab_map, base.identical)
    return base.with_vocab_map(Method.FUSECHAT, ids)
