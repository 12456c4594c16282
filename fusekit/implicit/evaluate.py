"""Stage 5 (eval): mean reward on the eval prompts for the target before, after SFT, after DPO, and
every source, sampling with the same settings as stage 1; a table (rich) and a bar chart (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from fusekit.implicit.config import SampleOptions
from fusekit.implicit.prompts import Prompt
from fusekit.implicit.sample import sample_model
from fusekit.implicit.score import Scorer
from fusekit.implicit.stage import write_parquet


def evaluate_model(name: str, model: str | Path, prompts: list[Prompt], opts: SampleOptions, scorer: Scorer, folder: Path) -> dict:
    """Sample `model` on `prompts` (resumable parts under folder/name), score, summarise.

    Every model draws the same random numbers (stream "eval"), so differences are the models'.

    Returns {"model", "mean_reward" (over scored responses; NaN if none), "responses", "failed", "finished"}
    where finished is the share of responses that ended with EOS.
    """
    path = folder / f"{name}.parquet"
    if path.is_file():
        scored = pl.read_parquet(path)
        failed = int(scored["reward"].null_count())
    else:
        frame, _ = sample_model(model, name, prompts, opts, folder / name / "parts", stream="eval")
        scored, report = scorer.score(frame, {p.id: p for p in prompts})
        failed = report.failed
        write_parquet(scored, path)
    rewards = scored["reward"].drop_nulls()
    return {
        "model": name,
        "mean_reward": float(rewards.mean()) if len(rewards) else math.nan,
        "responses": scored.height,
        "failed": failed,
        "finished": float((scored["finish_reason"] == "stop").mean()),
    }


def results_table(rows: list[dict]):
    """One row per model: mean reward (best in bold), responses, failures, share ended with EOS."""
    from rich.table import Table

    table = Table(title="held-out mean reward (higher is better)", title_justify="left")
    for col, just in (("model", "left"), ("role", "left"), ("mean reward", "right"), ("responses", "right"), ("failed", "right"), ("ended with EOS", "right")):
        table.add_column(col, justify=just)
    finite = [r["mean_reward"] for r in rows if math.isfinite(r["mean_reward"])]
    best = max(finite, default=math.nan)
    for r in rows:
        text = f"{r['mean_reward']:.4f}"
        table.add_row(r["model"], r["role"], f"[bold green]{text}[/]" if r["mean_reward"] == best else text, str(r["responses"]), str(r["failed"]), f"{r['finished']:.0%}")
    return table


def plot_results(rows: list[dict], path: Path) -> Path | None:
    """Bars of mean held-out reward per model (target variants, then sources); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["model"] for r in rows]
    values = [r["mean_reward"] for r in rows]
    colors = ["tab:blue" if r["role"].startswith("target") else "tab:gray" for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    for i, v in enumerate(values):
        if math.isfinite(v):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("mean held-out reward (higher is better)")
    ax.set_title("fusekit implicit fusion: target before / after SFT / after DPO, and the sources")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
