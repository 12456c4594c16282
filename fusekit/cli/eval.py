"""`fusekit eval`: mean cross-entropy / perplexity on datasets, and lm-evaluation-harness tasks, for one
or more models (folders, .gguf files, hub ids) in one table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fusekit.cli.app import app
from fusekit.cli.errors import fail, handle_errors


def model_labels(models: list[str]) -> list[str]:
    """Table names of the models: a folder's or file's name, or the hub id; repeats get #2, #3, …"""
    from fusekit.models.identity import model_name

    labels: list[str] = []
    for m in models:
        base = model_name(m)
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}#{n}"
        labels.append(label)
    return labels


@app.command("eval")
@handle_errors
def eval_command(
    model: List[str] = typer.Option(..., "--model", "-m", metavar="MODEL", help="Model folder, .gguf file or hub id; repeat for one table of several models."),
    data: List[Path] = typer.Option([], "--data", "-d", metavar="DATA", help="Text file, folder, JSONL (text or messages) or Parquet: mean CE / perplexity; repeatable."),
    tasks: List[str] = typer.Option(
        [], "--tasks", "-t", metavar="TASKS", help="lm-evaluation-harness tasks (names, groups, tags; comma-separated or repeated). Needs pip install 'fusekit[eval]'."
    ),
    include_path: List[Path] = typer.Option([], "--include-path", metavar="FOLDER", help="Folder of local task YAMLs (a task whose dataset is a local JSON/JSONL file)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per prompt (default: each task's own)."),
    limit: Optional[float] = typer.Option(None, help="Examples per task (a value below 1 is a share): for quick checks."),
    chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template", help="Wrap task prompts in the tokenizer's chat template."),
    out: Path = typer.Option(Path("fusekit-eval"), "--out", "-o", help="With --tasks: where lm-eval's results JSON (one per model), tasks.md and summary.json go."),
    field: str = typer.Option("text", help="The text field of JSONL/Parquet records (--data)."),
    max_length: int = typer.Option(2048, help="--data: window length in tokens (texts are cut as extraction cuts them)."),
    batch_size: int = typer.Option(8, help="Packed rows (--data) or lm-eval requests (--tasks) per forward pass."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] (default: CUDA when present)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables: the --data rows (a list), or {data, tasks} with --tasks."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Evaluate each --model: mean CE (nats/token) and perplexity on each --data set, and lm-eval --tasks.

    Models are loaded by fusekit (so .gguf files work as folders do) and handed to lm-eval as objects;
    the task figures are lm-eval's own. Offline: give local tasks with --include-path.
    """
    if not progress or as_json:
        # lm-eval's and datasets' tqdm bars: tqdm reads TQDM_DISABLE when it is first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from fusekit.eval import evaluate_loaded
    from fusekit.eval.harness import TaskOptions, evaluate_tasks, markdown_table, resolve_tasks, results_json, split_names, task_rows, task_table
    from fusekit.models.load import load_model, load_tokenizer

    if not data and not tasks:
        fail("nothing to evaluate: give --data (perplexity) and/or --tasks (lm-eval)")
    options = resolved = None
    if tasks:
        options = TaskOptions(
            tasks=split_names(tasks), include_path=tuple(str(p) for p in include_path), num_fewshot=num_fewshot,
            limit=int(limit) if limit is not None and limit >= 1 else limit, batch_size=batch_size,
            apply_chat_template=chat_template,
        )
        resolved = resolve_tasks(options)  # bad names and missing task files fail before any model loads
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = model_labels(model)
    ce_rows: list[dict] = []
    t_rows: list[dict] = []
    for ref, label in zip(model, labels):
        net = load_model(ref).to(dev).eval()
        tokenizer = load_tokenizer(ref)
        for d in data:
            result = evaluate_loaded(
                net, tokenizer, d, field=field, max_length=max_length, batch_size=batch_size,
                progress=progress and not as_json, label=f"{label} · {d.name}" if len(model) > 1 else d.name,
            )
            ce_rows.append({"model": label, "dataset": str(d), **result})
        if options is not None:
            results = evaluate_tasks(net, tokenizer, options, resolved)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{label.replace('/', '__')}.json").write_text(results_json(results) + "\n")
            t_rows.extend(task_rows(label, results))
        del net
    if options is not None:
        (out / "tasks.md").write_text(markdown_table(t_rows))
        summary = {"models": dict(zip(labels, model)), "options": options.identity(), "tasks": t_rows, "data": ce_rows}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps({"data": ce_rows, "tasks": t_rows} if options is not None else ce_rows, indent=2))
        return
    console = Console()
    if ce_rows:
        console.print(_ce_table(ce_rows, title=model[0] if len(model) == 1 else "mean CE per model and dataset"))
    if t_rows:
        console.print(task_table(t_rows))
        Console(stderr=True).print(f"lm-eval results: {out}/ (one JSON per model, tasks.md, summary.json)", highlight=False)


def _ce_table(rows: list[dict], title: str) -> Table:
    several = len({r["model"] for r in rows}) > 1
    table = Table(title=title)
    columns = (["model"] if several else []) + ["dataset", "mean CE", "perplexity", "tokens", "texts", "windows"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "dataset") else "right")
    for r in rows:
        cells = [r["dataset"], f"{r['mean_ce']:.4f}", f"{r['perplexity']:.3f}", f"{r['tokens']:,}", str(r["texts"]), str(r["windows"])]
        table.add_row(*([r["model"]] if several else []), *cells)
    return table
