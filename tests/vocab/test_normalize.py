"""Token normalisation: every scheme maps to the text the token stands for."""

from __future__ import annotations

import numpy as np
import pytest

import fusekit
from fusekit import Scheme, normalize_token
from fusekit.vocab.normalize import STRAY_BYTE_BASE

TEXT = "The cat sat on the mat.\nIt was happy, then it slept:  quietly."


def test_byte_level_markers():
    assert normalize_token("Ġhello", "byte_level") == " hello"
    assert normalize_token("Ċ", "byte_level") == "\n"
    assert normalize_token("ĠĠ", "byte_level") == "  "
    assert normalize_token("Ã©", "byte_level") == "é"  # the two UTF-8 bytes of é
    assert normalize_token("Ã", "byte_level") == chr(STRAY_BYTE_BASE + 0xC3)  # half a character
    assert normalize_token("<|endoftext|>", "byte_level") == "<|endoftext|>"


def test_sentencepiece_markers():
    assert normalize_token("▁hello", Scheme.SENTENCEPIECE) == " hello"
    assert normalize_token("<0x0A>", "sentencepiece") == "\n"
    assert normalize_token("<0xC3>", "sentencepiece") == chr(STRAY_BYTE_BASE + 0xC3)
    # A split character looks the same from either family.
    assert normalize_token("<0xC3>", "sentencepiece") == normalize_token("Ã", "byte_level")


def test_wordpiece_markers():
    assert normalize_token("##ing", "wordpiece") == "ing"
    assert normalize_token("play", "wordpiece") == " play"


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError):
        normalize_token("x", "morse")


def test_scheme_is_derived_from_real_tokenizers(tokenizers_by_kind):
    assert fusekit.token_scheme(tokenizers_by_kind["bpe"]) is Scheme.BYTE_LEVEL
    assert fusekit.token_scheme(tokenizers_by_kind["unigram"]) is Scheme.SENTENCEPIECE
    assert fusekit.token_scheme(tokenizers_by_kind["wordpiece"]) is Scheme.WORDPIECE
    assert fusekit.token_scheme(tokenizers_by_kind["bpe"].backend_tokenizer) is Scheme.BYTE_LEVEL


def test_normalised_tokens_spell_the_text(tokenizers_by_kind):
    bpe = tokenizers_by_kind["bpe"]
    vocab = fusekit.normalize_vocab(bpe)
    assert len(vocab) == len(bpe)
    ids = bpe(TEXT, add_special_tokens=False)["input_ids"]
    assert "".join(vocab[i] for i in ids) == TEXT  # byte-level BPE is lossless
    uni = tokenizers_by_kind["unigram"]
    uvocab = fusekit.normalize_vocab(uni)
    uids = uni(TEXT, add_special_tokens=False)["input_ids"]
    # Metaspace turns every space into ▁ (and prefixes one): the words and spaces come back.
    assert "".join(uvocab[i] for i in uids).split() == TEXT.split()


def _tokens_and_spans(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    vocab = fusekit.normalize_vocab(tok)
    return [vocab[i] for i in enc["input_ids"]], [end for _, end in enc["offset_mapping"]]


def _assert_same_span_tokens_are_aligned(src_tok, tgt_tok, text):
    """Tokens that end at the same character with the same text must be aligned to each other."""
    src, src_end = _tokens_and_spans(src_tok, text)
    tgt, tgt_end = _tokens_and_spans(tgt_tok, text)
    path = {tuple(p) for p in fusekit.align_tokens(src, tgt).tolist()}
    same = [(i, j) for i in range(len(src)) for j in range(len(tgt))
            if src[i].strip() and src[i].strip() == tgt[j].strip() and src_end[i] == tgt_end[j]]
    assert len(same) >= 3
    assert sum(p in path for p in same) / len(same) >= 0.9


def test_different_tokenizers_align_sensibly(tokenizers_by_kind):
    text = " ".join(TEXT.split())  # single spaces: both families then spell the same words
    _assert_same_span_tokens_are_aligned(tokenizers_by_kind["bpe"], tokenizers_by_kind["unigram"], text)
    _assert_same_span_tokens_are_aligned(tokenizers_by_kind["bpe"], tokenizers_by_kind["wordpiece"], text)


@pytest.mark.real_model
def test_real_smollm2_tokenizer_normalises_and_aligns(smollm2_tokenizer, tokenizers_by_kind):
    tok = smollm2_tokenizer
    assert fusekit.token_scheme(tok) is Scheme.BYTE_LEVEL
    vocab = fusekit.normalize_vocab(tok)
    assert len(vocab) == 49152
    text = "Knowledge fusion moves what several models know into one. It aligns tokens first."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(vocab[i] for i in ids) == text
    # On a short text a few same-span pairs are pulled off by their neighbours' costs; the statistic
    # is meaningful over a page of real prose.
    from fusekit import zoo

    page = " ".join(zoo.stdlib_texts("prose")[70].split())[:1500]
    _assert_same_span_tokens_are_aligned(tok, tokenizers_by_kind["unigram"], page)
    # The vocabulary map sends every SmolLM2 token somewhere in the small vocabulary, exact where it can.
    uvocab = fusekit.normalize_vocab(tokenizers_by_kind["unigram"])
    mapping, stats = fusekit.map_vocab_with_stats(vocab, uvocab)
    assert mapping.min() >= 0 and mapping.max() < len(uvocab)
    exact = [i for i, s in enumerate(vocab) if s in set(uvocab)]
    assert stats.exact == len(exact) > 100
    assert all(uvocab[mapping[i]] == vocab[i] for i in exact[:500])
