"""Moving a source model's next-token distributions onto a target tokenizer's positions.

Three methods, switchable per source (docs/ALIGN.md has the worked example):

* ``bytespan`` (default): the chain-rule transfer on exact byte spans (`rust/src/transfer.rs`). Every
  target position gets the source's probability of each target piece: 1:1 positions as FuseLLM carries
  them, 1:n positions the first piece of each candidate and then the conditional continuation given the
  pieces already emitted, n:1 positions the chain rule along the source positions the target token covers.
  A model transferred onto itself gets its own distribution back.
* ``fusellm``: the paper's rule — DTW over normalised token strings, exact/MinED vocabulary map, only
  1:1 positions carry — with the byte-fallback-twin, special-token and padded-id bugs fixed.
* ``fusechat``: FuseChat's statistical vocabulary map (`statmap.py`: each source token to the target token
  it most often begins together with over the corpus) in place of exact/MinED, then the same 1:1 carry.

`Transferer` is the engine, prepared once per vocabulary pair: `fusekit align` runs it over extraction
stores (`bytespan.py`), and the text-level API `transfer(text, source_tokenizer, target_tokenizer, …)`
(`text_transfer.py`) over one text (one code path for both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, Sequence

import numpy as np

import fusekit._core as _core
from fusekit.align.spans import byte_spans
from fusekit.align.tokens import TokenTable, align_ids_batch, align_topk, carried_mass
from fusekit.align.vocab_cache import exact_map, fusellm_vocab_map, pair_digest
from fusekit.vocab.info import VocabInfo


class Method(str, Enum):
    BYTESPAN = "bytespan"
    FUSELLM = "fusellm"
    FUSECHAT = "fusechat"


DEFAULT_METHOD = Method.BYTESPAN

# How a row was reached (`Transfer.kind`; the KIND_* constants of rust/src/transfer.rs).
KIND_NAMES = ("fallback", "1:1", "1:n", "n:1", "last")


@dataclass
class Transfer:
    """A source's distributions on the target's positions of one text.

    Row j predicts target token j+1 (the last row is empty). `ids` int32 [n, m] target ids (−1 empty),
    `probs` float32 [n, m] (rows sum to 1 where non-empty), `carried` bool [n] (False: the row is the
    one-hot fallback on the next target token), `true_prob` float32 [n], NaN where not carried: with
    `bytespan` the source's (unnormalised) probability of the *target's* true next token — its −ln is
    the like-for-like CE; with `fusellm` the paper's metric, the source's probability of *its own* next
    token at the aligned position. `source_row` int32 [n]: the source row the transfer started from, −1
    on fallback. `kind` uint8 [n]: how the row was reached, an index into `KIND_NAMES` (the paper's rules
    carry 1:1 rows only). `mass` float32 [n], NaN where not carried: the probability mass the row held
    before its renormalisation — the source's probability of the kept target pieces (`probs · mass` is the
    row as transferred; with `bytespan` `true_prob` = probs[truth] · mass where the truth is kept) — and
    1 − mass what the source's top-k could not place there (`rust/src/transfer.rs`, `kept_mass`).
    """

    ids: np.ndarray
    probs: np.ndarray
    carried: np.ndarray
    true_prob: np.ndarray
    source_row: np.ndarray
    kind: np.ndarray
    mass: np.ndarray

    @property
    def ce(self) -> np.ndarray:
        """float32 [n], nats: −ln of the source's probability of the target's next token; NaN where not
        carried or where that probability is unknown (the true token outside what the top-k scores)."""
        known = self.carried & (self.true_prob > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(known, -np.log(np.where(known, self.true_prob, 1.0)), np.nan).astype(np.float32)


@dataclass
class TextTokens:
    """One model's tokens of one text: ids int64 [n] and character start offsets int64 [n]; `spans`
    int64 [n, 2] byte spans when already known (else derived from the starts, `spans.byte_spans`)."""

    ids: np.ndarray
    starts: np.ndarray
    spans: np.ndarray | None = None


@dataclass
class TextItem:
    """One text for `Transferer.run_texts`: `text` the target's rendering, both models' tokens of it, the
    source's top-k ids int [m, k] and log-probs float [m, k], `true_logp` float [m] or None (see `run`),
    `source_text` the source's own rendering when it differs (chat templates: its tokens' offsets are in
    that text), `recall_seed` the seed of a perfect source whose recall to measure too (None: not)."""

    text: str
    source: TextTokens
    target: TextTokens
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    true_logp: np.ndarray | None = None
    source_text: str | None = None
    recall_seed: int | None = None


def _positions(tokens: TextTokens) -> np.ndarray:
    """What `_core.transfer_texts` takes: byte spans int64 [n, 2] when known, else character starts [n]."""
    if tokens.spans is not None:
        return np.ascontiguousarray(tokens.spans, dtype=np.int64).reshape(-1, 2)
    return np.ascontiguousarray(tokens.starts, dtype=np.int64).reshape(-1)


def encode_offsets(tokenizer: Any, text: str) -> TextTokens:
    """A tokenizer's ids and character start offsets of `text`, no special tokens added."""
    if hasattr(tokenizer, "backend_tokenizer"):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
    else:
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids, offs = enc.ids, enc.offsets
    return TextTokens(np.asarray(ids, np.int64).reshape(-1), np.asarray([s for s, _ in offs], np.int64).reshape(-1))


class Transferer:
    """A source→target vocabulary pair, prepared once (Rust tables, vocabulary map) for many texts.

    `vocab_map` int64 [V_s] (−1 = nowhere): the map of the 1:1 carry (`fusellm`: FuseLLM's fixed map when
    not given; `fusechat`: required, from `statmap.statistical_vocab_map` — ValueError without it)."""

    def __init__(self, source: VocabInfo, target: VocabInfo, method: Method | str = DEFAULT_METHOD, vocab_map: np.ndarray | None = None, threads: int | None = None):
        self.source, self.target, self.method, self.threads = source, target, Method(method), threads
        if self.method is Method.BYTESPAN:
            self._src = _core.TransferSource(source.bytes, source.eos, source.eot)
            self._tgt = _core.TransferTarget(target.bytes, target.usable.tolist(), target.twin.astype(np.uint8).tolist(), target.eos, target.eot)
        else:
            if vocab_map is None and self.method is Method.FUSECHAT:
                raise ValueError("the fusechat method needs its statistical vocabulary map (fusekit.align.statmap): pass vocab_map")
            self.vocab_map = vocab_map if vocab_map is not None else fusellm_vocab_map(source, target, threads)
            self.src_table, self.tgt_table = TokenTable(list(source.strings)), TokenTable(list(target.strings))

    def with_vocab_map(self, method: Method | str, vocab_map: np.ndarray) -> "Transferer":
        """The same pair (tables shared, nothing rebuilt) carrying through another map, e.g. `fusechat`'s."""
        if self.method is Method.BYTESPAN:
            raise ValueError("the bytespan method has no vocabulary map to replace")
        other = copy.copy(self)
        other.method, other.vocab_map = Method(method), np.asarray(vocab_map, np.int64)
        return other

    @cached_property
    def pair(self) -> str:
        """Digest of both vocabularies (`vocab_cache.pair_digest`): which alignment counts belong here."""
        return pair_digest(self.source, self.target)

    @cached_property
    def identical(self) -> np.ndarray:
        """int64 [V_s]: each source id's identical (usable) target id, −1 where none."""
        return exact_map(self.source, self.target).ids

    def run(self, items: Sequence[tuple], out_k: int) -> list[Transfer]:
        """items: (text, source tokens, target tokens, source top-k ids [m, k], log-probs [m, k][, true_logp [m]]).

        `true_logp` (optional): log-probability of each row's true next source token (−CE, as extraction
        stores it; NaN unknown). With it the true token keeps its exact probability where it fell out of
        the top-k, so every position's like-for-like CE is known."""
        if self.method is Method.BYTESPAN:
            texts = [
                TextItem(item[0], item[1], item[2], item[3], item[4], item[5] if len(item) > 5 else None)
                for item in items
            ]
            return [transfer for transfer, _ in self.run_texts(texts, out_k)]
        return [self._fusellm(item[1], item[2], item[3], item[4], out_k) for item in items]

    def run_texts(
        self, items: Sequence["TextItem"], out_k: int, perfect_logp: tuple[float, float] = (0.0, 0.0)
    ) -> list[tuple[Transfer, np.ndarray | None]]:
        """The byte-span transfer of whole texts, in parallel on `threads` cores with the GIL released
        (`rust/src/whole_text.rs`): per item (its `Transfer`, and where the item names a `recall_seed`
        bool [n − 1] the target positions a perfect source recalls, `recall.recalled`). Byte spans
        come from the tokens' character starts where not given; a `source_text` (the source's own
        rendering of a chat) has its spans carried into the target's text (`remap.remap_spans`). The
        result does not depend on the number of threads. `perfect_logp`: the perfect source's log-probability
        on its true next token and on each other id (`recall.perfect_logp(k)`). Raises ValueError on
        inconsistent arrays."""
        if self.method is not Method.BYTESPAN:
            raise ValueError(f"run_texts is the bytespan method's; this Transferer uses {self.method.value}")
        batch = []
        for it in items:
            src_text = None if it.source_text is None or it.source_text == it.text else it.source_text.encode("utf-8", "surrogatepass")
            batch.append((
                it.text.encode("utf-8", "surrogatepass"),
                src_text,
                np.asarray(it.source.ids, np.int64),
                _positions(it.source),
                np.asarray(it.target.ids, np.int64),
                _positions(it.target),
                np.ascontiguousarray(it.topk_ids, dtype=np.int64),
                np.ascontiguousarray(it.topk_logp, dtype=np.float32),
                None if it.true_logp is None else np.ascontiguousarray(it.true_logp, dtype=np.float32),
                it.recall_seed,
            ))
        raw = _core.transfer_texts(self._src, self._tgt, batch, out_k, self.threads, perfect_logp=perfect_logp)
        return [
            (Transfer(ids=i, probs=p, carried=c, true_prob=t, source_row=r, kind=kind, mass=kept), hits)
            for i, p, c, t, kind, r, hits, kept in raw
        ]

    def spans(self, text: str, tokens: TextTokens, table: Sequence[bytes]) -> np.ndarray:
        """int64 [n, 2] byte spans of `tokens` in `text`; `table`: their vocabulary's bytes (`source.bytes`
        or `target.bytes`: computed in Rust; any other table: the Python reference `spans.byte_spans`)."""
        if tokens.spans is not None:
            return tokens.spans
        side = getattr(self, "_src", None) if table is self.source.bytes else getattr(self, "_tgt", None) if table is self.target.bytes else None
        if side is None:
            return byte_spans(text, tokens.starts, [table[i] for i in np.asarray(tokens.ids).tolist()])
        return side.spans(text.encode("utf-8", "surrogatepass"), np.asarray(tokens.ids, np.int64), np.asarray(tokens.starts, np.int64))

    def source_spans(self, text: str, tokens: TextTokens) -> np.ndarray:
        """int64 [m, 2] byte spans of source tokens in `text`."""
        return self.spans(text, tokens, self.source.bytes)

    def _fusellm(self, src: TextTokens, tgt: TextTokens, topk_ids, topk_logp, out_k: int) -> Transfer:
        n = len(tgt.ids)
        if not len(src.ids) or not n:
            ids = np.full((n, out_k), -1, np.int32)
            probs = np.zeros((n, out_k), np.float32)
            if n:
                ids[:-1, 0], probs[:-1, 0] = tgt.ids[1:], 1.0
            kind = np.zeros(n, np.uint8)
            kind[-1:] = KIND_NAMES.index("last")
            nan = np.full(n, np.nan, np.float32)
            return Transfer(ids, probs, np.zeros(n, bool), nan, np.full(n, -1, np.int32), kind, nan.copy())
        (path,) = align_ids_batch(self.src_table, self.tgt_table, [(src.ids, tgt.ids)], threads=self.threads)
        out = align_topk(path, src.ids, tgt.ids, self.vocab_map, topk_ids, topk_logp, one_to_one=self.method is Method.FUSECHAT)
        out.carried[-1] = False  # the last row predicts nothing: empty, as with bytespan
        out.ids[-1], out.probs[-1] = -1, 0.0
        k = out.ids.shape[1]
        ids = np.full((n, out_k), -1, np.int32)
        probs = np.zeros((n, out_k), np.float32)
        w = min(k, out_k)
        ids[:, :w], probs[:, :w] = out.ids[:, :w], out.probs[:, :w]
        total = probs.sum(axis=1, keepdims=True)
        # The carried rows' mass before renormalising: the source row's usable top-k mass (`carried_mass`),
        # times the share of it the first out_k entries keep.
        kept = carried_mass(out.carried, out.src_pos, np.asarray(topk_ids), np.asarray(topk_logp), self.vocab_map)
        mass = np.where(out.carried, kept * total[:, 0], np.nan).astype(np.float32)
        probs = np.divide(probs, total, out=probs, where=total > 0)
        true = np.full(n, np.nan, np.float32)
        rows = np.flatnonzero(out.carried[:-1])
        if rows.size:
            # The paper's metric: the source's own CE at the aligned position, i.e. p of *its* next token.
            pos = out.src_pos[rows]
            nxt = np.asarray(src.ids)[np.minimum(pos + 1, len(src.ids) - 1)]
            hit = np.asarray(topk_ids)[pos] == nxt[:, None]
            lp = np.where(hit, np.asarray(topk_logp, np.float64)[pos], -np.inf).max(axis=1)
            true[rows] = np.exp(lp)
        kind = out.carried.astype(np.uint8)  # 1 = KIND_NAMES' "1:1"
        kind[-1:] = KIND_NAMES.index("last")
        return Transfer(ids, probs, out.carried.copy(), true, out.src_pos.astype(np.int32), kind, mass)
