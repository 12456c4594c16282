"""`fusekit align-text`: show how one text's target positions get a source's distribution, for any method."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fusekit.align import align_tokens
from fusekit.align.transfer import Method
from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors
from fusekit.models.tokenizer_file import load_tokenizer


@app.command("align-text")
@handle_errors
def align_text(
    text: str = typer.Argument(..., help="The text both tokenizers segment."),
    source: Path = typer.Option(..., "--source", "-s", help="Source tokenizer: a tokenizer.json, a .gguf file or a model folder."),
    target: Path = typer.Option(..., "--target", "-t", help="Target tokenizer: a tokenizer.json, a .gguf file or a model folder."),
    method: Method = typer.Option(
        Method.BYTESPAN, "--method", "-M",
        help="The transfer to show (as `fusekit align --method`): per target token, the source token its row "
        "starts from, how (1:1, 1:n, n:1) and what a perfect source passes on.",
    ),
    path: bool = typer.Option(
        False, "--path", help="Show the DTW path over normalised strings and FuseLLM's vocabulary map instead (what fusellm aligns on)."
    ),
) -> None:
    """Show how the TARGET tokenizer's positions of TEXT get the SOURCE's distributions, as a table."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise typer.BadParameter("TEXT is not valid UTF-8") from None
    src_tok, tgt_tok = load_tokenizer(source), load_tokenizer(target)
    src_ids = src_tok.encode(text, add_special_tokens=False).ids
    tgt_ids = tgt_tok.encode(text, add_special_tokens=False).ids
    if not src_ids or not tgt_ids:
        raise typer.BadParameter("the text tokenises to nothing; give some text")
    if len(tgt_ids) < 2:
        raise typer.BadParameter("the text is one target token: no target position predicts another; give a longer text")
    if path:
        table, footer = _path_table(src_tok, tgt_tok, src_ids, tgt_ids)
    else:
        table, footer = _transfer_table(text, src_tok, tgt_tok, method)
    console = Console()
    console.print(table)
    console.print(footer)


def _show(token: bytes) -> str:
    """A token's bytes as text, bytes outside UTF-8 as \\xNN (a byte-level piece of a character)."""
    return repr(token.decode("utf-8", "backslashreplace")).replace("\\\\x", "\\x") if token else "(special)"


def _transfer_table(text: str, src_tok, tgt_tok, method: Method) -> tuple[Table, str]:
    from fusekit.align.recall import perfect_source_topk, recalled
    from fusekit.align.text_transfer import cached_transferer, transfer
    from fusekit.align.transfer import KIND_NAMES, encode_offsets

    t = cached_transferer(src_tok, tgt_tok, Method.BYTESPAN)  # the token bytes, for any method
    src, tgt = encode_offsets(src_tok, text), encode_offsets(tgt_tok, text)
    ids, logp = perfect_source_topk(src.ids, 4, len(t.source))
    out = transfer(text, src_tok, tgt_tok, ids, logp, method=method)
    hit = recalled(out, tgt.ids)
    table = Table(title=f"{len(tgt.ids)} target tokens from {len(src.ids)} source tokens ({method.value})")
    for col in ("j", "target token j+1", "from source", "how", "p(true)"):
        table.add_column(col)
    for j in range(len(tgt.ids) - 1):
        nxt = int(tgt.ids[j + 1])
        if not out.carried[j]:
            src_cell, how, p_cell = "—", "fallback", ""
        else:
            u = int(out.source_row[j]) + 1
            src_cell = f"{u} {_show(t.source.bytes[src.ids[u]])}"
            how = KIND_NAMES[out.kind[j]]
            p_true = float(out.probs[j][out.ids[j] == nxt].sum())
            p_cell = f"{p_true:.3f}" + (" ✓" if hit[j] else "")
        table.add_row(str(j), _show(t.target.bytes[nxt]), src_cell, how, p_cell)
    footer = f"perfect-source recall on this text: {hit.mean():.3f} ({int(hit.sum())} of {len(hit)} target positions)"
    return table, footer


def _path_table(src_tok, tgt_tok, src_ids: list[int], tgt_ids: list[int]) -> tuple[Table, str]:
    import numpy as np

    from fusekit.align.vocab_cache import fusellm_vocab_map
    from fusekit.vocab.info import vocab_info

    s_info, t_info = vocab_info(src_tok), vocab_info(tgt_tok)
    # The map the fusellm transfer uses: byte-fallback twins, special and padded ids excluded.
    vmap = fusellm_vocab_map(s_info, t_info)
    src = [s_info.strings[i] for i in src_ids]
    tgt = [t_info.strings[i] for i in tgt_ids]
    path = align_tokens(src, tgt)
    table = Table(title=f"{len(src)} source × {len(tgt)} target tokens, DTW path of {len(path)} steps")
    for col in ("i", "source", "j", "target", "agree"):
        table.add_column(col)
    for i, j in path.tolist():
        agree = "✓" if vmap[src_ids[i]] == tgt_ids[j] else ""
        table.add_row(str(i), _show(s_info.bytes[src_ids[i]]), str(j), _show(t_info.bytes[tgt_ids[j]]), agree)
    mapped = vmap >= 0
    exact = mapped & np.array([vmap[i] >= 0 and s_info.strings[i] == t_info.strings[vmap[i]] for i in range(len(vmap))])
    return table, (
        f"vocabulary map: {int(exact.sum())} exact, {int((mapped & ~exact).sum())} by minimum edit distance, "
        f"{int((~mapped).sum())} special or padded (mapped nowhere)"
    )
