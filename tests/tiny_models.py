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


def write_tiny_llama_gguf(path: Path, vocab: int = 96, hidden: int = 32, layers: int = 1, heads: int = 2, ffn: int = 64,
                          seed: int = 0) -> Path:
    """A tiny Llama as a GGUF file (float32 tensors, tied output embedding, no tokenizer), as llama.cpp lays it
    out: transformers reads its config from the metadata and un-permutes the q/k rows it expects there."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)

    def tensor(*shape: int):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def gain(n: int):
        return np.ones(n, np.float32) + tensor(n)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tensor("token_embd.weight", tensor(vocab, hidden))
    w.add_tensor("output_norm.weight", gain(hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", gain(hidden))
        for name in ("q", "k", "v", "output"):
            w.add_tensor(f"blk.{i}.attn_{name}.weight", tensor(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", gain(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", tensor(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", tensor(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", tensor(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
