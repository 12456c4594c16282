"""`fusekit extract`: run a model over a corpus and store its top-k next-token distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("extract")
@handle_errors
def extract_command(
    model: str = typer.Option(..., "--model", "-m", help="Model folder, .gguf file or Hugging Face hub id."),
    data: Path = typer.Option(..., "--data", "-d", help="Text file (one text per line), folder or glob of text files, JSONL (--field or chat `messages`), Parquet (file, folder or glob) or a `datasets` save_to_disk folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Store folder (created; re-running resumes it)."),
    top_k: int = typer.Option(10, "--top-k", "-k", help="Next-token candidates kept per position."),
    max_length: int = typer.Option(2048, help="Window length in tokens (capped by the model's context)."),
    batch_size: int = typer.Option(8, help="Rows of --max-length tokens per forward pass (windows packed into rows)."),
    shard: Optional[str] = typer.Option(None, help="Do only shard I of N (0-based, e.g. 0/4), so N jobs can share a corpus."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", "--shards", help="Shards of the whole run (default: about 1M tokens each)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when present)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32 (default: fp32 on CPU, bf16 on GPU)."),
    field: str = typer.Option("text", help="The text field of JSONL / column of Parquet records."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code (only for models you trust)."),
    append_eos: bool = typer.Option(True, "--eos/--no-eos", help="End every plain text with the tokenizer's end-of-sequence token (FuseLLM's reference does)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the shards on Ray: 'auto' (the running cluster), an address, or 'local'."),
    ray_workers: Optional[int] = typer.Option(None, help="Ray workers, one model each (default: one per GPU, else per CPU)."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack short windows into shared rows (no compute on padding)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (a line per shard when not in a terminal)."),
) -> None:
    """Store MODEL's top-k next-token distribution and cross-entropy for every token of DATA in OUT.

    Shards are written atomically and skipped when complete, so a killed run resumes where it stopped,
    byte for byte. `fusekit inspect OUT` summarises and verifies the store.
    """
    from fusekit.extract import extract
    from fusekit.store.extract_store import ExtractStore
    from fusekit.store.extract_summary import summarize

    extract(
        model, data, out, top_k=top_k, max_length=max_length, batch_size=batch_size, shard=shard, num_shards=num_shards,
        device=device, dtype=dtype, field=field, trust_remote_code=trust_remote_code, append_eos=append_eos,
        progress=progress, pack=pack, ray=ray, ray_workers=ray_workers,
    )
    store = ExtractStore(out)
    done = [n for n, _, ok in store.shard_ranges() if ok]
    s = summarize([store.sidecar(n) for n in done])
    corpus = store.manifest.get("corpus", {})
    skipped = corpus.get("skipped_empty", 0) + corpus.get("skipped_non_utf8", 0)
    console = Console()
    console.print(
        f"[bold]{out}[/]: {len(done)}/{store.num_shards} shards, {s['tokens']:,} tokens, "
        f"{s['bytes_per_token']:.1f} B/token, compression KL {s['kl_mean']:.2e} nats, mean CE {s['ce_mean']:.3f}",
        highlight=False, soft_wrap=True,
    )
    if skipped:
        console.print(
            f"skipped {corpus.get('skipped_empty', 0)} empty and {corpus.get('skipped_non_utf8', 0)} non-UTF-8 texts of {data}",
            style="yellow", highlight=False, soft_wrap=True,
        )
