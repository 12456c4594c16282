"""Extraction-store stand-ins for the align tests: real tiny models' top-k over real tokenisations.

`MemoryExtractStore` has the ExtractStore interface (settings, vocab, iter_texts, …) and holds Windows
computed here with torch (whole text tokenised once, consecutive non-overlapping windows, full-softmax
log-probs, CE of the next token with NaN at each window's last position). It pickles, so a subprocess
or a Ray task can use it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from fusekit.align import normalize_vocab, token_scheme
from fusekit.vocab.info import vocab_info
from fusekit.store.types import Window


@dataclass
class MemoryExtractStore:
    settings: dict
    vocab: list[str]
    scheme: str
    texts: dict[int, list[Window]]
    n_texts: int
    is_complete: bool = True
    manifest: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.settings["k"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.settings["tokenizer_fingerprint"]

    @property
    def corpus_fingerprint(self) -> str:
        return self.settings["corpus_fingerprint"]

    def complete(self) -> bool:
        return self.is_complete

    def iter_texts(self, text_ids: range | None = None) -> Iterator[tuple[int, list[Window]]]:
        wanted = range(self.n_texts) if text_ids is None else text_ids
        for t in wanted:
            if self.texts.get(t):
                yield t, self.texts[t]

    def iter_windows(self) -> Iterator[Window]:
        for _, ws in self.iter_texts():
            yield from ws

    def window_count(self) -> int:
        return sum(len(ws) for ws in self.texts.values())

    def token_count(self) -> int:
        return sum(len(w.input_ids) for ws in self.texts.values() for w in ws)


def corpus_digest(texts: list[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()


def extract_windows(model, tokenizer, text: str, text_id: int, k: int, max_length: int) -> list[Window]:
    import torch

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    out = []
    for w, lo in enumerate(range(0, len(ids), max_length)):
        hi = min(len(ids), lo + max_length)
        with torch.no_grad():
            logits = model(torch.as_tensor(ids[lo:hi])[None]).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        top = logp.topk(k, dim=-1)
        ce = np.full(hi - lo, np.nan, dtype=np.float32)
        nxt = torch.as_tensor(ids[lo + 1 : hi])
        ce[:-1] = (-logp[:-1].gather(1, nxt[:, None])[:, 0]).numpy()
        out.append(
            Window(
                text_id=text_id,
                window=w,
                char_start=0 if lo == 0 else int(offsets[lo]),
                char_end=len(text) if hi == len(ids) else int(offsets[hi]),
                input_ids=ids[lo:hi].copy(),
                offsets=offsets[lo:hi].copy(),
                topk_ids=top.indices.numpy().astype(np.int32),
                topk_logp=top.values.numpy().astype(np.float32),
                ce=ce,
                mean_ce=float(np.nanmean(ce)) if hi - lo > 1 else math.nan,
                text=text[(0 if lo == 0 else int(offsets[lo])) : (len(text) if hi == len(ids) else int(offsets[hi]))],
            )
        )
    return out


def memory_store(model, tokenizer, texts: list[str], *, k: int, max_length: int, name: str) -> MemoryExtractStore:
    vocab_size = int(model.config.vocab_size)
    vocab = normalize_vocab(tokenizer, size=vocab_size)
    fp = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    settings = {
        "model": name,
        "tokenizer_fingerprint": fp,
        "corpus_fingerprint": corpus_digest(texts),
        "vocab_size": vocab_size,
        "k": k,
        "max_length": max_length,
        "field": "text",
    }
    by_text = {i: extract_windows(model, tokenizer, t, i, k, max_length) for i, t in enumerate(texts)}
    store = MemoryExtractStore(settings=settings, vocab=vocab, scheme=str(token_scheme(tokenizer).value), texts=by_text, n_texts=len(texts))
    store.vocab_info = vocab_info(tokenizer, vocab_size)
    return store


def extract_three(root: Path, tokenizers_by_kind: dict, texts: list[str], *, k: int, window: int) -> dict:
    """Tiny models of three architectures and tokenizer families, extracted over one corpus by `fusekit.extract`."""
    import fusekit
    from fusekit import zoo

    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    stores = {}
    for kind, arch, seed in (("bpe", "gpt2", 0), ("unigram", "llama", 1), ("wordpiece", "gpt_neox", 2)):
        model = zoo.build_tiny_model(arch, tokenizers_by_kind[kind], root / f"model-{kind}", seed=seed, hidden=32)
        stores[kind] = fusekit.run_extract(str(model), corpus, root / f"x-{kind}", top_k=k, max_length=window, num_shards=2, progress=False).out
    return {"root": root, "stores": stores, "corpus": corpus, "texts": texts}
