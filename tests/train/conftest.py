"""Fixtures of the online-distillation tests: tiny models with three tokenizer kinds and a small corpus."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def online_models(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    """A Llama target (byte-level BPE), two teachers with other tokenizers (Unigram Llama, WordPiece GPT-2),
    windows of up to 64 tokens, and a corpus of six short texts (one a line)."""
    from fusekit import zoo

    root = tmp_path_factory.mktemp("online-models")
    target = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], root / "target", hidden=32, context=64, seed=0)
    t1 = zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], root / "t1", hidden=32, context=64, seed=1)
    t2 = zoo.build_tiny_model("gpt2", tokenizers_by_kind["wordpiece"], root / "t2", hidden=32, context=64, seed=2)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ")[:200] for t in corpus_texts[:6]) + "\n")
    return {"target": target, "teachers": [t1, t2], "corpus": corpus, "root": root}
