"""`map_vocab` on real vocabularies (Qwen2 152k, Llama-3 128k, GPT-2 50k, Llama-2 32k) against brute force:
the pruned Rust search must give exactly the brute force's target (same minimum edit distance, same
lowest-index tie-break) for sampled source strings, most of them without an exact match."""

from __future__ import annotations

import random

import pytest

import fusekit
from fusekit.vocab.info import vocab_info
from real_tokenizers import real_tokenizer
from reference import map_vocab as ref_map_vocab
from reference import map_vocab_vectorized


def test_vectorized_reference_equals_the_plain_one():
    rng = random.Random(5)
    tgt = ["".join(rng.choice("abé日 ") for _ in range(rng.randint(0, 7))) for _ in range(120)]
    src = ["".join(rng.choice("abcé日 ") for _ in range(rng.randint(0, 9))) for _ in range(80)]
    usable = [rng.random() < 0.8 for _ in tgt]
    assert map_vocab_vectorized(src, tgt, usable) == ref_map_vocab(src, tgt, usable)


def _sample(strings: list[str], exact: set[str], n_inexact: int, n_any: int, seed: int) -> list[int]:
    """Ids of `n_inexact` sources with no exact target and `n_any` others, in a fixed random order."""
    rng = random.Random(seed)
    inexact = [i for i, s in enumerate(strings) if s not in exact]
    return rng.sample(inexact, n_inexact) + rng.sample(range(len(strings)), n_any)


@pytest.mark.parametrize(
    ("src_name", "tgt_name", "n_inexact"),
    [("qwen2", "llama-bpe", 200), ("llama-bpe", "llama-spm", 200), ("gpt-2", "llama-spm", 200)],
)
def test_map_vocab_equals_brute_force_on_real_vocabularies(src_name, tgt_name, n_inexact):
    # Each source string maps on its own, so mapping the sample alone is the whole-vocabulary answer.
    src, tgt = vocab_info(real_tokenizer(src_name)), vocab_info(real_tokenizer(tgt_name))
    usable = tgt.usable.tolist()
    exact = {t for t, ok in zip(tgt.strings, usable) if ok}
    sample = [src.strings[i] for i in _sample(src.strings, exact, n_inexact, 40, seed=len(src_name))]
    ids, stats = fusekit.map_vocab_with_stats(sample, tgt.strings, threads=2, tgt_usable=usable)
    assert stats.exact == sum(s in exact for s in sample)
    assert ids.tolist() == map_vocab_vectorized(sample, tgt.strings, usable)
