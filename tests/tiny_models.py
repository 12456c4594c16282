"""Tiny real models for pipeline tests: each its own tokenizer family, vocabulary size and architecture."""

from __future__ import annotations

from pathlib import Path

from fusekit import zoo

# name → (architecture, tokenizer family, vocabulary size)
THREE_FAMILIES = {
    "target": ("llama", "bpe", 600),
    "gpt": ("gpt2", "unigram", 500),
    "neox": ("gpt_neox", "bpe", 700),
}


def build_models(root: Path, specs: dict[str, tuple[str, str, int]], texts: list[str]) -> dict[str, Path]:
    """Tokenizers trained on `texts`, random-initialised 1-layer models; returns name → model folder."""
    out = {}
    for name, (arch, kind, vocab) in specs.items():
        tok = zoo.train_tokenizer(kind, texts, vocab_size=vocab)
        out[name] = zoo.build_tiny_model(arch, tok, root / name, hidden=32, layers=1, heads=2, context=128)
    return out
