"""FuseLLM's claim across seeds: the demo run end to end with several seeds, mean ± spread.

    python benchmarks/bench_demo.py [--quick] [--seeds 0 1 2] [--out bench-demo] [--no-real]

Each seed redoes everything: corpora and tokenizers are fixed; model initialisation, pre-training,
fusion training and data order depend on the seed. Prints, per variant, the held-out average CE
(nats/token, target tokenizer) as mean ± standard deviation over seeds, and the paired gap to the
CLM-only baseline (fused − CLM, per seed), which is the comparison FuseLLM makes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench-demo"))
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()

    from fusekit.demo.run import run_demo

    runs: dict[int, dict] = {}
    for seed in args.seeds:
        started = time.perf_counter()
        results = run_demo(args.out / f"seed-{seed}", quick=args.quick, seed=seed, real=args.real, progress=False)
        runs[seed] = {"average_ce": results["claim"]["average_ce"], "seconds": time.perf_counter() - started}
        print(f"seed {seed}: {json.dumps(runs[seed])}", flush=True)

    roles = ["before", "clm", "min_ce", "avg_ce"]

    def stats(values: list[float]) -> str:
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.4f} ± {spread:.4f}"

    rows = []
    for role in roles:
        values = [r["average_ce"][role] for r in runs.values()]
        gaps = [r["average_ce"][role] - r["average_ce"]["clm"] for r in runs.values()]
        wins = sum(g < 0 for g in gaps)
        rows.append([role, stats(values), stats(gaps) if role != "clm" else "—", f"{wins}/{len(gaps)}" if role not in ("clm",) else "—"])
    print_table(f"demo over seeds {args.seeds}", ["variant", "avg held-out CE (mean ± sd)", "minus CLM-only (paired)", "seeds below CLM"], rows)
    print(f"seconds per run: {[round(r['seconds']) for r in runs.values()]}")
    (args.out / "bench_demo.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
