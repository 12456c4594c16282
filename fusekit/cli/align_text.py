"""`fusekit align-text`: show how two tokenizers' tokens of one text align (a quick look at the DTW)."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fusekit.align import align_tokens, map_vocab_with_stats, normalize_vocab
from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors
from fusekit.tokenizer_io import load_tokenizer


@app.command("align-text")
@handle_errors
def align_text(
    text: str = typer.Argument(..., help="The text both tokenizers segment."),
    source: Path = typer.Option(..., "--source", "-s", help="Source tokenizer: a tokenizer.json or a model folder."),
    target: Path = typer.Option(..., "--target", "-t", help="Target tokenizer: a tokenizer.json or a model folder."),
) -> None:
    """Align the SOURCE and TARGET tokenisations of TEXT and print the path as a table."""
    src_tok, tgt_tok = load_tokenizer(source), load_tokenizer(target)
    src_vocab, tgt_vocab = normalize_vocab(src_tok), normalize_vocab(tgt_tok)
    src_ids = src_tok.encode(text, add_special_tokens=False).ids
    tgt_ids = tgt_tok.encode(text, add_special_tokens=False).ids
    if not src_ids or not tgt_ids:
        raise typer.BadParameter("the text tokenises to nothing; give some text")
    src = [src_vocab[i] for i in src_ids]
    tgt = [tgt_vocab[i] for i in tgt_ids]
    path = align_tokens(src, tgt)
    vmap, stats = map_vocab_with_stats(src_vocab, tgt_vocab)
    table = Table(title=f"{len(src)} source × {len(tgt)} target tokens, path of {len(path)} steps")
    for col in ("i", "source", "j", "target", "agree"):
        table.add_column(col)
    for i, j in path.tolist():
        agree = "✓" if vmap[src_ids[i]] == tgt_ids[j] else ""
        table.add_row(str(i), repr(src[i]), str(j), repr(tgt[j]), agree)
    console = Console()
    console.print(table)
    console.print(f"vocabulary map: {stats.exact} exact, {stats.min_ed} by minimum edit distance")
