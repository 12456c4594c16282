"""The demo's result: tables (rich), results.json and a bar chart (PNG).

Per-token CE is comparable only between models that share a tokenizer (the target and its trained
variants); nats per character compares every model, the sources included; so do the downstream tasks
(accuracy and exact match are per question, whatever the tokenizer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _pivot(rows: list[dict], metric: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        value = r.get(metric)
        if value is not None:
            out.setdefault(r["model"], {})[r["dataset"]] = float(value)
    for values in out.values():
        values["average"] = sum(values.values()) / len(values)
    return out


def summarise(rows: list[dict], variants: dict[str, str]) -> dict:
    """Held-out CE per model and domain, and whether FuseLLM's claim holds on this run.

    `variants`: role → model name for "before", "clm", and each fused variant — the models that share
    the target's tokenizer, whose per-token CE is comparable.
    """
    ce = {m: v for m, v in _pivot(rows, "mean_ce").items() if m in variants.values()}
    npc = _pivot(rows, "nats_per_char")
    avg = {role: ce[name]["average"] for role, name in variants.items() if name in ce}
    fused = {role: a for role, a in avg.items() if role not in ("before", "clm")}
    claim = {
        "average_ce": avg,
        "best_fused": min(fused, key=fused.get) if fused else None,
        "fused_beats_clm": {role: a < avg["clm"] for role, a in fused.items()} if "clm" in avg else {},
        "fused_beats_before": {role: a < avg["before"] for role, a in fused.items()} if "before" in avg else {},
    }
    return {"ce_per_token": ce, "nats_per_char": npc, "claim": claim}


# The downstream table's columns: the headline metric of each demo task (`fusekit.demo.tasks`).
# Next line: accuracy with each choice's log-likelihood per byte (lm-eval's acc_norm), as papers report
# HellaSwag/ARC; a sum over tokens would favour the lines a tokenizer cuts into fewer pieces.
HEADLINE = {"demo_next_line_": ("acc_norm", "next line · {}"), "demo_complete_code": ("exact_match", "code completion")}


def downstream(task_rows: list[dict]) -> dict:
    """{"downstream": {model: {column: value}}, "downstream_stderr": {model: {column: stderr}}, "downstream_samples": {column: n}}."""
    values: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    for r in task_rows:
        for prefix, (metric, label) in HEADLINE.items():
            if r["task"].startswith(prefix) and r["metric"] == metric and r["filter"] == "none":
                column = label.format(r["task"][len(prefix):])
                values.setdefault(r["model"], {})[column] = r["value"]
                if r["stderr"] is not None:
                    stderr.setdefault(r["model"], {})[column] = r["stderr"]
                samples[column] = r["samples"]
    return {"downstream": values, "downstream_stderr": stderr, "downstream_samples": samples} if values else {}


def _downstream_table(summary: dict) -> Table:
    """Models as rows, tasks as columns: value ± lm-eval's standard error; the best of each column in bold."""
    values, stderr = summary["downstream"], summary.get("downstream_stderr", {})
    columns = list(dict.fromkeys(c for v in values.values() for c in v))
    table = Table(title="downstream tasks (lm-eval; higher is better; ± standard error over the questions)", title_justify="left")
    table.add_column("model")
    for c in columns:
        n = summary.get("downstream_samples", {}).get(c)
        table.add_column(f"{c} (n={n})" if n else c, justify="right")
    best = {c: max((v[c] for v in values.values() if c in v), default=math.nan) for c in columns}
    for model, v in values.items():
        cells = []
        for c in columns:
            if c not in v:
                cells.append("—")
                continue
            text = f"{v[c]:.3f}" + (f" ± {stderr[model][c]:.3f}" if c in stderr.get(model, {}) else "")
            cells.append(f"[bold green]{text}[/]" if v[c] == best[c] else text)
        table.add_row(model, *cells)
    return table


def _table(title: str, values: dict[str, dict[str, float]], domains: list[str]) -> Table:
    """One row per model; the lowest value of each column in bold."""
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for d in [*domains, "average"]:
        table.add_column(d, justify="right")
    best = {d: min((v[d] for v in values.values() if d in v), default=math.nan) for d in [*domains, "average"]}
    for model, v in values.items():
        cells = []
        for d in [*domains, "average"]:
            if d not in v:
                cells.append("—")
                continue
            text = f"{v[d]:.4f}"
            cells.append(f"[bold green]{text}[/]" if v[d] == best[d] else text)
        table.add_row(model, *cells)
    return table


def print_tables(summary: dict, domains: list[str], console: Console | None = None) -> None:
    console = console or Console()
    console.print(_table("held-out CE, nats/token (target tokenizer; lower is better)", summary["ce_per_token"], domains))
    console.print(_table("held-out nats/character (every model; lower is better)", summary["nats_per_char"], domains))
    if summary.get("downstream"):
        console.print(_downstream_table(summary))
    claim = summary["claim"]
    if claim["average_ce"]:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in claim["average_ce"].items())
        console.print(f"average held-out CE: {parts}")


def plot(summary: dict, domains: list[str], path: Path) -> Path | None:
    """Grouped bars of nats/char per domain, one bar per model; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    values = summary["nats_per_char"]
    models = list(values)
    cols = [*domains, "average"]
    width = 0.8 / max(len(models), 1)
    tasks = summary.get("downstream") or {}
    panels = 3 if tasks else 2
    fig, axes = plt.subplots(
        1, panels, figsize=(2.2 * len(cols) + 6 + (6 if tasks else 0), 4), gridspec_kw={"width_ratios": [3, 1, 2.5][:panels]}
    )
    ax, zoom = axes[0], axes[1]
    for i, m in enumerate(models):
        xs = [c + i * width for c in range(len(cols))]
        ax.bar(xs, [values[m].get(d, math.nan) for d in cols], width, label=m)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cols))], cols)
    ax.set_ylabel("held-out nats / character (lower is better)")
    finite = [v for m in models for v in values[m].values() if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, max(finite) * 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("every model, per domain")

    # The comparison FuseLLM makes is small next to the spread of models: give it its own scale.
    ce = {m: v["average"] for m, v in summary["ce_per_token"].items()}
    if ce:
        names = list(ce)
        zoom.bar(range(len(names)), [ce[n] for n in names], color="tab:gray")
        zoom.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        lo, hi = min(ce.values()), max(ce.values())
        pad = (hi - lo) * 0.3 or 0.01
        zoom.set_ylim(lo - pad, hi + pad)
        for i, n in enumerate(names):
            zoom.text(i, ce[n], f"{ce[n]:.4f}", ha="center", va="bottom", fontsize=7)
        zoom.set_title("target variants: avg CE, nats/token", fontsize=9)
    if tasks:
        down = axes[2]
        columns = list(dict.fromkeys(c for v in tasks.values() for c in v))
        stderr = summary.get("downstream_stderr", {})
        bar = 0.8 / max(len(tasks), 1)
        for i, m in enumerate(tasks):
            xs = [c + i * bar for c in range(len(columns))]
            down.bar(xs, [tasks[m].get(c, math.nan) for c in columns], bar, label=m,
                     yerr=[stderr.get(m, {}).get(c, 0.0) for c in columns], error_kw={"elinewidth": 0.6})
        down.set_xticks([c + 0.4 - bar / 2 for c in range(len(columns))], columns, fontsize=8)
        down.set_ylabel("accuracy / exact match (higher is better)")
        down.set_ylim(0, 1)
        down.axhline(0.25, color="gray", lw=0.6, ls=":")  # chance on four choices
        down.set_title("downstream tasks (lm-eval, ± s.e.)", fontsize=9)
    fig.suptitle("fusekit demo: FuseLLM in miniature")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
