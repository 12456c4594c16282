"""Extraction forward passes on texts of mixed lengths: packed rows vs padded batches vs a plain loop.

    python benchmarks/bench_extract_packing.py [--quick] [--device cpu|cuda] [--model DIR]

Corpus: window lengths drawn log-normal (median ~150 tokens, clipped to 20–2048 — chat turns next to
long documents), random token ids. Each method computes, for every window, the top-k under the full
softmax and the CE of each next token (`fusekit.extract.model`), batch = `--batch-size` rows:
- plain loop: windows in corpus order, `batch` at a time, padded to the longest (what a first script does);
- padded, sorted: longest first, padded to the longest of each batch (fusekit before packing; `--no-pack`);
- packed: first-fit decreasing into rows of `--max-length` tokens, attention kept inside each window
  by position ids that restart at 0 (fusekit's default).
Figures: tokens/s (real tokens only), the share of computed positions that are padding, and the
speed-up over the plain loop, all measured in this process. The model is a small random Llama (or
`--model`); its outputs are also compared across methods (max |Δ log p| of the top-k).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

from fusekit.extract.model import forward_topk, forward_topk_packed  # noqa: E402
from fusekit.models.packing import pack_windows, packing_supported  # noqa: E402


def lognormal_lengths(n: int, seed: int = 0, median: float = 150.0, sigma: float = 1.1, lo: int = 20, hi: int = 2048) -> list[int]:
    gen = np.random.default_rng(seed)
    return [int(x) for x in np.clip(np.round(gen.lognormal(np.log(median), sigma, n)), lo, hi)]


def tiny_llama(vocab: int, context: int, hidden: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=4,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=context,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def run(method: str, net, windows: list[np.ndarray], batch: int, width: int, k: int, vocab: int) -> tuple[float, float, dict]:
    """(seconds, padding share of computed positions, window index → result)."""
    results: dict[int, object] = {}
    computed = 0
    t0 = time.perf_counter()
    if method == "packed":
        rows = pack_windows([len(w) for w in windows], width)
        for lo in range(0, len(rows), batch):
            group = rows[lo : lo + batch]
            computed += len(group) * max(sum(len(windows[i]) for i in row) for row in group)
            results.update(forward_topk_packed(net, windows, group, k, vocab))
    else:
        order = list(range(len(windows)))
        if method == "padded, sorted":
            order.sort(key=lambda i: -len(windows[i]))
        for lo in range(0, len(order), batch):
            chosen = order[lo : lo + batch]
            computed += len(chosen) * max(len(windows[i]) for i in chosen)
            results.update(zip(chosen, forward_topk(net, [windows[i] for i in chosen], k, vocab)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    real = sum(len(w) for w in windows)
    return seconds, 1 - real / computed, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter windows (CI-sized)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a model folder (default: a random 4-layer Llama)")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="runs per method; the fastest counts")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    width = args.max_length or (512 if args.quick else 2048)
    n = args.windows or (120 if args.quick else 600)
    hidden = args.hidden or (64 if args.quick else 256)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_llama(4096, max(2048, width), hidden, Path(tmp) / "m")
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    vocab = int(net.config.vocab_size)
    lengths = [min(x, width) for x in lognormal_lengths(n, hi=2048)]
    gen = np.random.default_rng(1)
    windows = [gen.integers(0, vocab, m).astype(np.int64) for m in lengths]
    assert packing_supported(net, vocab), "this model does not keep packed windows apart"
    k = 10
    run("packed", net, windows[:4], args.batch_size, width, k, vocab)  # warm-up
    figures: dict[str, tuple] = {}
    for _ in range(args.repeat):  # interleaved, best of: the machine may be shared
        for m in ("plain loop", "padded, sorted", "packed"):
            got = run(m, net, windows, args.batch_size, width, k, vocab)
            if m not in figures or got[0] < figures[m][0]:
                figures[m] = got
    base = figures["plain loop"]
    real = sum(lengths)
    rows = []
    for name, (secs, pad, res) in figures.items():
        drift = max(float(np.abs(res[i].topk_logp - base[2][i].topk_logp).max()) for i in range(len(windows)))
        same_ids = np.mean([np.array_equal(res[i].topk_ids, base[2][i].topk_ids) for i in range(len(windows))])
        rows.append([name, f"{real / secs:,.0f}", f"{pad:.1%}", f"{base[0] / secs:.2f}×", f"{drift:.1e}", f"{same_ids:.1%}"])
    print_table(
        f"extraction forward on {n} windows, {real:,} tokens, log-normal lengths 20–{width} (median {int(np.median(lengths))}); "
        f"{args.device}, {str(dtype).replace('torch.', '')}, batch {args.batch_size} rows of ≤ {width} tokens, hidden {hidden}",
        ["method", "tokens/s", "padding", "vs plain loop", "max |Δ log p|", "same top-k ids"],
        rows,
    )


if __name__ == "__main__":
    main()
