"""`fusekit eval`: mean cross-entropy and perplexity of a model on one or more datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("eval")
@handle_errors
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Model folder, .gguf file or hub id."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Text file, folder, JSONL (text or messages) or Parquet; repeat for a table."),
    field: str = typer.Option("text", help="The text field of JSONL/Parquet records."),
    max_length: int = typer.Option(2048, help="Window length in tokens (texts are cut as extraction cuts them)."),
    batch_size: int = typer.Option(8, help="Packed rows per forward pass."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] (default: CUDA when present)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per dataset) instead of a table."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Print mean CE (nats/token) and perplexity of MODEL on each --data set."""
    import torch

    from fusekit.eval import evaluate_loaded
    from fusekit.models.load import load_model, load_tokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_model(model).to(dev).eval()
    tokenizer = load_tokenizer(model)
    rows = []
    for d in data:
        result = evaluate_loaded(
            net, tokenizer, d, field=field, max_length=max_length, batch_size=batch_size,
            progress=progress and not as_json, label=d.name,
        )
        rows.append({"dataset": str(d), **result})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{model}")
    for col in ("dataset", "mean CE", "perplexity", "tokens", "texts", "windows"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for r in rows:
        table.add_row(r["dataset"], f"{r['mean_ce']:.4f}", f"{r['perplexity']:.3f}", f"{r['tokens']:,}", str(r["texts"]), str(r["windows"]))
    Console().print(table)
