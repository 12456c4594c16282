"""`fusekit prepare`: cut a corpus once into pieces every model sees whole (see fusekit/prepare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("prepare")
@handle_errors
def prepare_command(
    data: Path = typer.Option(..., "--data", "-d", help="The corpus: text file, folder of text files, JSONL or Parquet."),
    model: List[str] = typer.Option(..., "--model", "-m", metavar="MODEL", help="Every model that will be extracted (folder, .gguf, hub id, or just its tokenizer.json); repeat."),
    out: Path = typer.Option(..., "--out", "-o", help="The JSONL file to write (one piece per line)."),
    max_length: int = typer.Option(2048, help="Most tokens in a piece under any model's tokenizer (the extraction window)."),
    field: str = typer.Option("text", help="The text field of JSONL / column of Parquet records."),
) -> None:
    """Cut a corpus once into pieces that every model sees whole.

    Long texts of DATA become pieces of at most MAX_LENGTH tokens under every MODEL's tokenizer, cut at
    line breaks where possible, so each piece is one extraction window for every model (same context, no
    window boundary inside another model's window). Extract every model from OUT.
    """
    from fusekit.prepare import prepare_corpus
    from fusekit.models.load import load_tokenizer

    stats = prepare_corpus(data, out, [load_tokenizer(m) for m in model], max_length, field)
    typer.echo(f"{out}: {stats.pieces:,} pieces from {stats.texts:,} texts ({stats.cut:,} cut)")
    if stats.skipped:
        typer.echo(f"warning: read {stats.skipped}", err=True)
