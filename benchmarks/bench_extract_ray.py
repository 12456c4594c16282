"""`fusekit extract --ray local` with 2 workers vs a serial run of the same store (same files, checked).

    python benchmarks/bench_extract_ray.py [--texts 64] [--workers 2] [--hidden 128]

A random Llama (4 layers) over the standard library's prose texts, 8 shards. Wall time of the whole
`fusekit.extract` call, Ray start-up included (a running cluster would save it); the ratio says how
much of N workers' capacity the shards use. On a machine with fewer free cores than workers the
ratio shows the contention, not the method.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

import fusekit  # noqa: E402
from fusekit import zoo  # noqa: E402
from fusekit.extract import ExtractStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [t.replace("\n", " ")[:3000] for t in zoo.stdlib_texts("prose", limit=args.texts)]
        tok = zoo.train_tokenizer("bpe", texts, vocab_size=2000)
        model = zoo.build_tiny_model("llama", tok, root / "m", hidden=args.hidden, context=512)
        corpus = root / "d.txt"
        corpus.write_text("\n".join(texts) + "\n")
        kw = dict(top_k=10, max_length=256, batch_size=4, num_shards=args.shards, progress=False)
        t0 = time.perf_counter()
        serial = fusekit.run_extract(model, corpus, root / "serial", **kw).out
        t_serial = time.perf_counter() - t0
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        par = fusekit.run_extract(model, corpus, root / "ray", ray="auto", ray_workers=args.workers, **kw).out
        t_ray = time.perf_counter() - t0
        ray.shutdown()
        same = all((serial / p.name).read_bytes() == p.read_bytes() for p in par.iterdir())
        tokens = ExtractStore(serial).token_count()
    print_table(
        f"extract: serial vs Ray ({args.workers} local workers), {args.texts} texts, {tokens:,} tokens, {args.shards} shards",
        ["run", "seconds", "tokens/s", "speed-up", "files identical"],
        [["serial", t_serial, f"{tokens / t_serial:,.0f}", "1.00×", "—"], [f"ray × {args.workers}", t_ray, f"{tokens / t_ray:,.0f}", f"{t_serial / t_ray:.2f}×", str(same)]],
    )


if __name__ == "__main__":
    main()
