"""One training step: plain CLM vs the sparse fusion loss vs a dense-target implementation.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--hidden 768 --layers 12 …]

A Llama-architecture model built from a config (random weights; the timing does not depend on them),
a batch of B×L tokens and a fused target of k·(K+1) = 40 ids per position (k = 10, K = 3 sources).
A step is forward + loss + backward + AdamW. Each variant runs in its own process so its peak memory
is its own: on CPU the peak RSS over the steps (VmHWM reset after warm-up) above the RSS before them,
on CUDA `max_memory_allocated` above the memory held before them (bf16 autocast). Ratios are against
the CLM step measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

VARIANTS = {
    "clm": "plain CLM (F.cross_entropy)",
    "sparse": "fusion λ=0.9, sparse (fusekit)",
    "dense": "fusion λ=0.9, dense [B,L,V] target",
}


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusekit._procmem import memory_mb, reset_peak
    from fusekit.train.loss import dense_fused_loss, fused_loss

    torch.manual_seed(0)
    dev = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.length, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g).to(dev)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    t_ids = torch.randint(0, args.vocab, (args.batch, args.length, 40), generator=g).to(dev, torch.int32)
    t_p = torch.softmax(torch.randn(args.batch, args.length, 40, generator=g), -1).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        if args.child == "clm":
            loss = fused_loss(logits, labels, None, None, 1.0)
        elif args.child == "sparse":
            loss = fused_loss(logits, labels, t_ids, t_p, 0.9)
        else:
            loss = dense_fused_loss(logits, labels, t_ids, t_p, 0.9)
        (loss.total / labels.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: optimizer state exists from here on
    sync()
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = memory_mb()["VmRSS"] * 2**20
        reset_peak()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else memory_mb()["VmHWM"] * 2**20
    return {"time": min(times), "peak": peak - base, "logits_bytes": args.batch * args.length * args.vocab * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller vocabulary and batch, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--length", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = dict(vocab=8000, hidden=64, layers=2, batch=2, length=128, repeat=3) if args.quick else dict(
        vocab=32000, hidden=128, layers=2, batch=4, length=256, repeat=5
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "vocab", "hidden", "layers", "batch", "length", "repeat")
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if run.returncode != 0:
            sys.exit(f"{name} failed:\n{run.stderr[-2000:]}")
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    clm = results["clm"]
    rows = [
        [VARIANTS[n], r["time"] * 1e3, r["time"] / clm["time"], r["peak"] / 2**20, r["peak"] / clm["peak"]]
        for n, r in results.items()
    ]
    print_table(
        f"train step on {args.device}: V={args.vocab}, hidden={args.hidden}×{args.layers}, B×L={args.batch}×{args.length} "
        f"(fp32 logits {clm['logits_bytes'] / 2**20:.0f} MiB)",
        ["loss", "step ms", "× CLM time", "step peak MiB", "× CLM memory"],
        rows,
    )


if __name__ == "__main__":
    main()
