"""`fusekit align-text`: show how one text's target positions get a source's distribution, for either method."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fusekit.align import align_tokens, map_vocab_with_stats, normalize_vocab
from fusekit.align.transfer import Method
from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors
from fusekit.tokenizer_io import load_tokenizer


@app.command("align-text")
@handle_errors
def align_text(
    text: str = typer.Argument(..., help="The text both tokenizers segment."),
    source: Path = typer.Option(..., "--source", "-s", help="Source tokenizer: a tokenizer.json, a .gguf file or a model folder."),
    target: Path = typer.Option(..., "--target", "-t", help="Target tokenizer: a tokenizer.json, a .gguf file or a model folder."),
    method: Method = typer.Option(
        Method.BYTESPAN, "--method", "-m",
        help="The transfer to show (see `fusekit align --help`): per target token, the source token its row "
        "starts from, how (1:1, 1:n, n:1) and what a perfect source passes on.",
    ),
    path: bool = typer.Option(False, "--path", help="Show the DTW path over normalised strings and the vocabulary map instead (what fusellm and fusechat align on)."),
) -> None:
    """Show how the TARGET tokenizer's positions of TEXT get the SOURCE's distributions, as a table."""
    src_tok, tgt_tok = load_tokenizer(source), load_tokenizer(target)
    src_ids = src_tok.encode(text, add_special_tokens=False).ids
    tgt_ids = tgt_tok.encode(text, add_special_tokens=False).ids
    if not src_ids or not tgt_ids:
        raise typer.BadParameter("the text tokenises to nothing; give some text")
    if path:
        table, footer = _path_table(src_tok, tgt_tok, src_ids, tgt_ids)
    else:
        table, footer = _transfer_table(text, src_tok, tgt_tok, src_ids, tgt_ids, method)
    console = Console()
    console.print(table)
    console.print(footer)


def _transfer_table(text: str, src_tok, tgt_tok, src_ids: list[int], tgt_ids: list[int], method: Method) -> tuple[Table, str]:
    import numpy as np

    from fusekit.align.recall import perfect_source_topk, recalled
    from fusekit.align.transfer import transfer

    src_vocab = normalize_vocab(src_tok)
    tgt_vocab = normalize_vocab(tgt_tok)
    ids, logp = perfect_source_topk(np.asarray(src_ids), 4, src_tok.get_vocab_size(with_added_tokens=True))
    out = transfer(text, src_tok, tgt_tok, ids, logp, method=method)
    hit = recalled(out, np.asarray(tgt_ids))
    spans = [src_tok.encode(text, add_special_tokens=False).offsets, tgt_tok.encode(text, add_special_tokens=False).offsets]
    table = Table(title=f"{len(tgt_ids)} target tokens from {len(src_ids)} source tokens ({method.value})")
    for col in ("j", "target token j+1", "from source", "how", "p(true)"):
        table.add_column(col)
    for j in range(len(tgt_ids) - 1):
        u = int(out.source_row[j]) + 1
        if not out.carried[j]:
            src_cell, how = "—", "fallback"
        else:
            src_cell = f"{u} {src_vocab[src_ids[u]]!r}"
            (ss, se), (ts, te) = spans[0][u], spans[1][j + 1]
            if method is not Method.BYTESPAN:  # the paper's rule carries 1:1 positions only
                how = "1:1"
            else:
                how = "1:1" if (ss, se) == (ts, te) else ("1:n" if ss < ts or se > te else "n:1")
        p_true = float(out.probs[j][out.ids[j] == tgt_ids[j + 1]].sum()) if out.carried[j] else float("nan")
        table.add_row(str(j), repr(tgt_vocab[tgt_ids[j + 1]]), src_cell, how, "" if np.isnan(p_true) else f"{p_true:.3f}" + (" ✓" if hit[j] else ""))
    footer = f"perfect-source recall on this text: {hit.mean():.3f} ({int(hit.sum())} of {len(hit)} target positions)" if len(hit) else ""
    return table, footer


def _path_table(src_tok, tgt_tok, src_ids: list[int], tgt_ids: list[int]) -> tuple[Table, str]:
    src_vocab, tgt_vocab = normalize_vocab(src_tok), normalize_vocab(tgt_tok)
    src = [src_vocab[i] for i in src_ids]
    tgt = [tgt_vocab[i] for i in tgt_ids]
    path = align_tokens(src, tgt)
    vmap, stats = map_vocab_with_stats(src_vocab, tgt_vocab)
    table = Table(title=f"{len(src)} source × {len(tgt)} target tokens, DTW path of {len(path)} steps")
    for col in ("i", "source", "j", "target", "agree"):
        table.add_column(col)
    for i, j in path.tolist():
        agree = "✓" if vmap[src_ids[i]] == tgt_ids[j] else ""
        table.add_row(str(i), repr(src[i]), str(j), repr(tgt[j]), agree)
    return table, f"vocabulary map: {stats.exact} exact, {stats.min_ed} by minimum edit distance"
