"""One training step: plain transformers CLM vs fusion through logits vs the fused head vs a dense target.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--hidden 768 --layers 12 …]
    python benchmarks/bench_train_step.py --goals     # issue 16's goals: V = 32k and 128k, B×L = 4×1024

Variants: `clm` is a plain `transformers` step (`model(input_ids, labels=…).loss`, the baseline);
`sparse` is fusekit's fusion loss on the model's [B, L, V] logits (the path before the fused head);
`fused` is the fused output layer + loss (`fusekit/train/linear_loss.py`, no [B, L, V] logits);
`dense` builds a dense [B, L, V] target as FuseLLM's reference code does.

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
    "clm": "plain transformers CLM",
    "sparse": "fusion λ=0.9 on [B,L,V] logits",
    "fused": "fusion λ=0.9, fused head (no logits)",
    "dense": "fusion λ=0.9, dense [B,L,V] target",
}
GOALS = {"memory": 0.30, "time": 1.10}  # fused vs clm: step memory growth, step time


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusekit._procmem import memory_mb, reset_peak
    from fusekit.train.head import FusionStep
    from fusekit.train.loss import dense_fused_loss

    torch.set_num_threads(args.threads)
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

    fusion = FusionStep(model, fused=args.child == "fused")

    def step():
        with autocast:
            if args.child == "clm":
                total = model(input_ids=ids, labels=ids, use_cache=False).loss * labels.numel()
            elif args.child in ("sparse", "fused"):
                total = fusion(ids, None, labels, t_ids, t_p, 0.9)[0]
            else:
                total = dense_fused_loss(model(input_ids=ids, use_cache=False).logits, labels, t_ids, t_p, 0.9).total
        (total / labels.numel()).backward()
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (default 1: a quiet core)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--goals", action="store_true", help="V = 32k and 128k at B×L = 4×1024, hidden 64: issue 16's goals")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.goals:
        defaults = dict(hidden=64, layers=2, batch=4, length=1024, repeat=2)
    elif args.quick:
        defaults = dict(vocab=8000, hidden=64, layers=2, batch=2, length=128, repeat=3)
    else:
        defaults = dict(vocab=32000, hidden=128, layers=2, batch=4, length=256, repeat=5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.child:
        print(json.dumps(child(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    if args.goals:
        variants = [v for v in variants if v != "dense"]  # tens of GiB at 128k; not part of the goals
    vocabs = [args.vocab] if args.vocab else [32768, 131072] if args.goals else [32000]
    report = []
    for vocab in vocabs:
        args.vocab = vocab
        results = {name: run_child(args, name) for name in ["clm"] + [v for v in variants if v != "clm"]}
        clm = results["clm"]
        rows = [
            [VARIANTS[n], r["time"] * 1e3, r["time"] / clm["time"], r["peak"] / 2**20, r["peak"] / clm["peak"]]
            for n, r in results.items()
        ]
        print_table(
            f"train step on {args.device}: V={vocab}, hidden={args.hidden}×{args.layers}, B×L={args.batch}×{args.length} "
            f"(fp32 logits {clm['logits_bytes'] / 2**20:.0f} MiB)",
            ["loss", "step ms", "× CLM time", "step peak MiB", "× CLM memory"],
            rows,
        )
        entry = {"vocab": vocab, **{n: r for n, r in results.items()}}
        if "fused" in results:
            f = results["fused"]
            entry["fused_vs_clm"] = {"time": f["time"] / clm["time"], "memory": f["peak"] / clm["peak"]}
            if args.goals:
                ok_t = f["time"] / clm["time"] <= GOALS["time"]
                ok_m = vocab < 131072 or f["peak"] / clm["peak"] <= GOALS["memory"]
                print(
                    f"V={vocab}: fused/CLM time {f['time'] / clm['time']:.2f}× (goal ≤ {GOALS['time']}×: "
                    f"{'met' if ok_t else 'MISSED'}), step memory growth {f['peak'] / clm['peak']:.3f}×"
                    + (f" (goal ≤ {GOALS['memory']}×: {'met' if ok_m else 'MISSED'})" if vocab >= 131072 else "")
                )
        report.append(entry)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "runs": report}, indent=2))


def run_child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name] + [
        f"--{k}={getattr(args, k)}" for k in ("device", "vocab", "hidden", "layers", "batch", "length", "repeat", "threads")
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if run.returncode != 0:
        sys.exit(f"{name} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
