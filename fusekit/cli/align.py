"""`fusekit align`: every source's top-k onto the target's tokens, from extraction stores to an aligned store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("align")
@handle_errors
def align_command(
    target: Path = typer.Option(..., "--target", "-t", help="The target model's extraction store (from `fusekit extract`)."),
    source: List[Path] = typer.Option(..., "--source", "-s", metavar="STORE", help="A source model's extraction store; repeat for each source, in order."),
    out: Path = typer.Option(..., "--out", "-o", help="The aligned store folder to write (resumed if it exists)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Do only shard I of N (0-based), e.g. 0/8: N independent jobs fill one store."),
    shards: Optional[int] = typer.Option(None, "--shards", "--num-shards", help="Number of shards N of a whole run (default: the existing store's, else the target store's)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Threads (default: all cores): up to this many shards aligned at once, their Rust kernels (DTW, byte-span transfer, decoding) sharing this many threads; the files do not depend on it. With --ray: CPUs per task (default 1)."),
    vocab_map_cache: Optional[Path] = typer.Option(
        None, "--vocab-map-cache", help="Folder of cached vocabulary maps and fusechat alignment counts (default ~/.cache/fusekit/vocab-maps)."
    ),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the shards as Ray tasks: 'auto' (the running cluster), an address, or 'local'."),
    method: List[str] = typer.Option(
        ["bytespan"], "--method", "-M", metavar="METHOD",
        help="How a source reaches the target's tokens: 'bytespan' (chain-rule transfer on byte spans, every position), "
        "'fusellm' (the paper's 1:1 carry) or 'fusechat' (the 1:1 carry through FuseChat's statistical vocabulary map, "
        "counted over this corpus). Once for all sources, or once per --source, in order.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars and the report table."),
) -> None:
    """Align each SOURCE store onto the TARGET store's tokens and write the candidates of fusion to OUT.

    Prints, per source, the share of target positions that took the source's distribution, the
    perfect-source recall (the share a source that always knows its next token would pass on), the mass on
    ids the target never emits (must be 0) and the vocabulary's exact matches; OUT/report.json holds the same.
    """
    from fusekit.align.stage import align_store

    align_store(
        target,
        list(source),
        out,
        shard=shard,
        num_shards=shards,
        workers=workers,
        vocab_map_cache=vocab_map_cache,
        ray=ray,
        method=method[0] if len(method) == 1 else list(method),
        progress=progress,
    )
