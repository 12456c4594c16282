"""Online distillation (`fusekit distill`) vs the offline pipeline (extract → align → train): step time, ratio.

    python benchmarks/bench_online.py [--device cuda] [--hidden 128 --layers 2 --texts 96 --steps 30 …]

A Llama target (byte-level BPE) and two teachers with other tokenizers (a Llama on Unigram, a GPT-2 on
WordPiece), random weights (the timing does not depend on them), vocabularies of 4,000 trained on the
standard library's prose; one corpus of `texts` texts cut into windows of `max_length` tokens, top-k 10.
Offline: extract the target and both teachers, align them (timed once), then train. Online: `distill`
with the same training options, teachers beside the target. Both train `steps` optimizer steps of
`batch_size` packed rows (unshuffled: the same windows in the same order), each run in a fresh process,
alternating, `repeat` times, the best kept; a step's time is the run's training wall time
(metrics.jsonl `elapsed_s` at the last step) over its steps, so the online teachers' work — done in the
engine's read-ahead thread, a group of texts at a time — is counted whatever step it falls in. Teacher
memory: each teacher's parameter bytes in the dtype it runs in (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--texts", type=int, default=96)
    ap.add_argument("--chars", type=int, default=1200)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=2, help="training runs per path (best taken)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training run (CPU: 2 threads on a "
                    "loaded 2-core machine made a step 4× slower than 1, swamping the comparison)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one training run (a child process)
    args = ap.parse_args()
    if args.run:
        return train_once(json.loads(args.run))

    import fusekit
    from fusekit import zoo
    from fusekit.train.online import param_bytes_of

    root = Path(tempfile.mkdtemp(prefix="bench-online-"))
    texts = [t.replace("\n", " ")[: args.chars] for t in zoo.stdlib_texts("prose", limit=args.texts)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    toks = {kind: zoo.train_tokenizer(kind, texts, vocab_size=args.vocab) for kind in ("bpe", "unigram", "wordpiece")}
    size = dict(hidden=args.hidden, layers=args.layers, context=max(256, args.max_length))
    target = zoo.build_tiny_model("llama", toks["bpe"], root / "target", seed=0, **size)
    teachers = [zoo.build_tiny_model("llama", toks["unigram"], root / "t1", seed=1, **size),
                zoo.build_tiny_model("gpt2", toks["wordpiece"], root / "t2", seed=2, **size)]
    # Unshuffled, so both paths train on the same windows in the same order (shuffled, their decode groups —
    # the store's row groups, the online source's groups of texts — would order the windows differently).
    train = dict(max_length=args.max_length, batch_size=args.batch_size, max_steps=args.steps, lr=1e-4, progress=False,
                 device=args.device, shuffle=False)

    t0 = time.perf_counter()
    stores = [fusekit.run_extract(m, corpus, root / f"x{i}", top_k=10, max_length=args.max_length, device=args.device,
                                  progress=False) for i, m in enumerate([target, *teachers])]
    t1 = time.perf_counter()
    aligned = fusekit.run_align(stores[0], stores[1:], root / "aligned", vocab_map_cache=root / "cache", progress=False)
    t2 = time.perf_counter()
    # Each training run in a fresh process (no warm-up carried from one to the next), alternating
    # offline/online `--repeat` times; the best of each (the least disturbed on a shared machine).
    runs: dict[str, list[tuple[float, int]]] = {"offline": [], "online": []}
    for r in range(args.repeat):
        for path in ("offline", "online"):
            out = root / f"{path}-{r}"
            job = dict(threads=args.threads, path=path, target=str(target), teachers=[str(t) for t in teachers], aligned=str(aligned.out),
                       corpus=str(corpus), out=str(out), train=train)
            subprocess.run([sys.executable, __file__, "--run", json.dumps(job)], check=True)
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[path].append((lines[-1]["elapsed_s"] / len(lines), sum(x["tokens"] for x in lines)))
    off_step, off_tokens = min(runs["offline"])
    on_step, on_tokens = min(runs["online"])
    dtype_bytes = 2 if args.device.startswith("cuda") else 4
    teacher_mib = [param_bytes_of(str(t), dtype_bytes) / 2**20 for t in teachers]
    figures = {
        "device": args.device, "steps": args.steps, "tokens": off_tokens, "online_tokens": on_tokens,
        "offline_step_s": off_step, "online_step_s": on_step, "runs": runs, "ratio": on_step / off_step,
        "extract_s": t1 - t0, "align_s": t2 - t1, "teacher_param_mib": teacher_mib,
        "offline_total_s": (t2 - t0) + off_step * args.steps, "online_total_s": on_step * args.steps,
    }
    print_table(
        f"online vs offline, {args.steps} steps of {args.batch_size}×{args.max_length} tokens on {args.device}",
        ["path", "s / step", "ratio", "preprocessing s"],
        [["offline (store)", off_step, 1.0, f"{t2 - t0:.1f} (extract {t1 - t0:.1f}, align {t2 - t1:.1f})"],
         ["online (teachers beside)", on_step, on_step / off_step, "0"]],
    )
    print(f"teachers' parameters: {', '.join(f'{m:.2f} MiB' for m in teacher_mib)} ({dtype_bytes}-byte weights)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


def train_once(job: dict) -> None:
    import torch

    import fusekit

    torch.set_num_threads(job["threads"])
    from fusekit.train.online import distill

    if job["path"] == "offline":
        fusekit.run_train(job["target"], job["aligned"], job["out"], **job["train"])
    else:
        distill(job["target"], job["teachers"], job["corpus"], job["out"], top_k=10, **job["train"])


if __name__ == "__main__":
    main()
