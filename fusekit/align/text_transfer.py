"""The text-level API: `transfer(text, source_tokenizer, target_tokenizer, …)` moves a source's top-k over
one text onto the target's tokens of that text (`fusekit.transfer`, `fusekit align-text`).

It tokenises the text with both tokenizers, checks the caller's arrays against the source's tokens, and
runs the same `Transferer` that `fusekit align` runs over stores (`transfer.py`); `fusechat` counts its
statistical map over the text itself unless corpus counts are given (`statmap.count_texts`). Transferers
are kept per tokenizer pair in this process, so repeated calls do not rebuild the vocabulary tables.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fusekit.align.statmap import AlignmentCounts, count_alignments, fusechat_transferer
from fusekit.align.transfer import DEFAULT_METHOD, Method, Transfer, Transferer, encode_offsets
from fusekit.vocab.info import vocab_info

_CACHE: dict[tuple[int, int, Method], tuple[Any, Any, Transferer]] = {}


def cached_transferer(source_tokenizer: Any, target_tokenizer: Any, method: Method) -> Transferer:
    """One `Transferer` per (source, target, method) tokenizer objects in this process: the vocabulary
    tables (and, for `fusellm`, the MinED map: minutes on 100k+ vocabularies) are built once."""
    key = (id(source_tokenizer), id(target_tokenizer), method)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not source_tokenizer or hit[1] is not target_tokenizer:
        if len(_CACHE) >= 16:
            _CACHE.clear()
        hit = (source_tokenizer, target_tokenizer, Transferer(vocab_info(source_tokenizer), vocab_info(target_tokenizer), method))
        _CACHE[key] = hit
    return hit[2]


def transfer(
    text: str,
    source_tokenizer: Any | str | Path,
    target_tokenizer: Any | str | Path,
    src_topk_ids: np.ndarray,
    src_topk_logp: np.ndarray,
    method: Method | str | None = None,
    out_k: int | None = None,
    counts: AlignmentCounts | None = None,
) -> Transfer:
    """Move a source's top-k next-token distributions over `text` onto the target's tokens of `text`.

    `src_topk_ids` int [n_s, k], `src_topk_logp` float [n_s, k] (log-probabilities, full softmax): row i
    predicts source token i+1 of `source_tokenizer(text, add_special_tokens=False)`. Returns a `Transfer`
    whose row j predicts target token j+1 of the target's tokens of `text`; `out_k` entries per row
    (default: k). Tokenizers: `tokenizers.Tokenizer`, transformers fast tokenizers, or a path (a model
folder, a tokenizer.json, a .gguf file, a hub id) loaded with `fusekit.models.load.load_tokenizer`. `method`: "bytespan"
    (default), "fusellm" or "fusechat". `counts` (fusechat only): the pair's alignment counts over a corpus
    (`fusekit.align.statmap.count_texts`); default: counted over `text` itself. Raises ValueError on arrays
    that do not match the source's tokens and on counts of another tokenizer pair.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    source_tokenizer, target_tokenizer = _loaded(source_tokenizer), _loaded(target_tokenizer)
    for name, tok in (("source_tokenizer", source_tokenizer), ("target_tokenizer", target_tokenizer)):
        if not hasattr(tok, "backend_tokenizer") and not hasattr(tok, "get_vocab_size"):
            raise TypeError(f"{name} must be a transformers fast tokenizer or a tokenizers.Tokenizer, got {type(tok).__name__}")
    try:
        method = Method(method or DEFAULT_METHOD)
    except ValueError:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(m.value for m in Method)}") from None
    topk_ids, topk_logp = np.asarray(src_topk_ids), np.asarray(src_topk_logp)
    src = encode_offsets(source_tokenizer, text)
    tgt = encode_offsets(target_tokenizer, text)
    if topk_ids.ndim != 2 or topk_ids.shape != topk_logp.shape or topk_ids.shape[0] != len(src.ids):
        raise ValueError(
            f"src_topk_ids {topk_ids.shape} and src_topk_logp {topk_logp.shape} must both be [n_s, k] with "
            f"n_s = {len(src.ids)} source tokens of the text"
        )
    if counts is not None and method is not Method.FUSECHAT:
        raise ValueError(f"counts are for the fusechat method, not {method.value}")
    if method is Method.FUSECHAT:
        base = cached_transferer(source_tokenizer, target_tokenizer, Method.FUSELLM)
        if counts is None:
            counts = count_alignments(base.src_table, base.tgt_table, [(src.ids, tgt.ids)], (len(base.source), len(base.target)), base.pair)
        elif not isinstance(counts, AlignmentCounts):
            raise TypeError(f"counts must be fusekit.align.statmap.AlignmentCounts, got {type(counts).__name__}")
        t = fusechat_transferer(base, counts)
    else:
        t = cached_transferer(source_tokenizer, target_tokenizer, method)
    _check_topk(topk_ids, topk_logp, len(t.source))
    out_k = topk_ids.shape[1] if out_k is None else out_k
    if not isinstance(out_k, (int, np.integer)) or out_k < 1:
        raise ValueError(f"out_k must be a positive integer, got {out_k!r}")
    if not len(tgt.ids):
        z = np.zeros(0, np.float32)
        return Transfer(np.zeros((0, out_k), np.int32), np.zeros((0, out_k), np.float32), np.zeros(0, bool), z, np.zeros(0, np.int32), np.zeros(0, np.uint8), z.copy())
    return t.run([(text, src, tgt, topk_ids, topk_logp)], int(out_k))[0]


def _check_topk(ids: np.ndarray, logp: np.ndarray, vocab_size: int) -> None:
    """Integer ids in [−1, V) (−1: an empty slot), log-probabilities ≤ 0 (−inf allowed for empty slots)."""
    if ids.shape[1] < 1:
        raise ValueError("src_topk_ids must hold at least one entry per row (k ≥ 1)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"src_topk_ids must be integer token ids, got {ids.dtype}")
    if not np.issubdtype(logp.dtype, np.floating):
        raise TypeError(f"src_topk_logp must be float log-probabilities, got {logp.dtype}")
    if ids.size and (ids.min() < -1 or ids.max() >= vocab_size):
        raise ValueError(f"src_topk_ids must lie in [-1, {vocab_size}) (the source vocabulary; -1 = empty slot), got {ids.min()}..{ids.max()}")
    if np.isnan(logp).any() or (logp > 1e-4).any() or np.isposinf(logp).any():
        raise ValueError("src_topk_logp must be log-probabilities (≤ 0, no NaN or +inf); pass log-softmax values, not probabilities or logits")


def _loaded(tokenizer: Any) -> Any:
    """A tokenizer given by path, loaded (ModelLoadError names it when it cannot be); objects as they are."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return _load_tokenizer(os.fspath(tokenizer))
    return tokenizer


@lru_cache(maxsize=8)
def _load_tokenizer(ref: str) -> Any:
    # Kept per path, so repeated calls by path reuse one object and hence one cached Transferer.
    from fusekit.models.load import load_tokenizer

    return load_tokenizer(ref)
