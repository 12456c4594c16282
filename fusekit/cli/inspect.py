"""`fusekit inspect DIR`: what a store holds, and whether every shard is intact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fusekit.cli.app import app
from fusekit.cli.errors import fail, handle_errors

_BAR = "▏▎▍▌▋▊▉█"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text[:16] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _histogram(hist: list[int], bin_width: float, width: int = 40) -> list[str]:
    """Text bars of the non-empty stretch of a histogram."""
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        return []
    top = max(hist)
    lines = []
    for i in range(nz[0], nz[-1] + 1):
        units = hist[i] / top * width * len(_BAR)
        full, part = divmod(int(round(units)), len(_BAR))
        bar = "█" * full + (_BAR[part - 1] if part else "")
        edge = f"≥{i * bin_width:5.2f}" if i == len(hist) - 1 else f"{i * bin_width:5.2f}–{(i + 1) * bin_width:5.2f}"
        lines.append(f"  {edge} {bar} {hist[i]:,}")
    return lines


@app.command("inspect")
@handle_errors
def inspect_command(
    folder: Path = typer.Argument(..., help="A store folder (from `fusekit extract`, `fusekit align`, …)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary and the problems as JSON."),
) -> None:
    """Print a store's manifest, shards, size and (extraction stores) compression KL and CE distribution;
    verify every shard's sha256 (and stamp the intact ones, so that readers need not hash them again).

    Exit status: 0 sound and complete; 1 a corrupt, foreign or unreadable file (named); 2 shards still missing.
    """
    from fusekit.store.extract_format import CE_BIN, FORMAT
    from fusekit.store.extract_summary import summarize
    from fusekit.store.shards import complete_shards, read_manifest, stamp_shard, verify_store

    manifest = read_manifest(folder)
    problems = verify_store(folder)
    sidecars = complete_shards(folder)
    # Every shard just hashed and found intact is stamped: readers trust it at start-up without hashing.
    bad = {p.split(":", 1)[0] for p in problems}
    for name in sidecars:
        if name not in bad:
            stamp_shard(folder, name)
    summary = summarize(list(sidecars.values())) if manifest.get("format") == FORMAT else None
    missing_only = bool(problems) and all(": missing shard" in p for p in problems)
    if as_json:
        typer.echo(json.dumps({"manifest": manifest, "summary": summary, "problems": problems}, indent=2, default=str))
    else:
        _print(Path(folder), manifest, sidecars, summary, problems, CE_BIN)
    if problems:
        if missing_only:
            raise typer.Exit(2)
        fail(f"{folder}: {len(problems)} problem(s):\n" + "\n".join(p for p in problems if ": missing shard" not in p))


def _print(folder: Path, manifest: dict, sidecars: dict, summary: dict | None, problems: list[str], ce_bin: float) -> None:
    console = Console()
    console.print(f"[bold]{folder}[/]  format [cyan]{manifest.get('format')}[/]  fusekit {manifest.get('fusekit_version')}", highlight=False)
    settings = Table(title="settings", show_header=False, title_justify="left")
    settings.add_column("key")
    settings.add_column("value")
    for key, value in sorted(manifest.get("settings", {}).items()):
        settings.add_row(key, _short(value))
    for key in ("corpus",):
        if key in manifest:
            settings.add_row(key, _short(manifest[key]))
    console.print(settings)

    shards = Table(title="shards", title_justify="left")
    for col in ("file", "rows", "tokens", "bytes", "B/token", "status"):
        shards.add_column(col, justify="left" if col in ("file", "status") else "right")
    bad = {p.split(":", 1)[0]: p.split(":", 1)[1].strip() for p in problems}
    names = sorted(set(sidecars) | {n for n in bad if n.endswith(".parquet")})
    for name in names:
        info = sidecars.get(name, {})
        size = info.get("bytes") or ((folder / name).stat().st_size if (folder / name).is_file() else None)
        tokens = info.get("tokens")
        bpt = f"{size / tokens:.2f}" if size and tokens else ""
        status = f"[red]{bad[name]}[/]" if name in bad else "[green]ok[/]"
        shards.add_row(name, str(info.get("rows", "")), f"{tokens:,}" if tokens else "", f"{size:,}" if size else "", bpt, status)
    console.print(shards)

    if summary is not None and summary["tokens"]:
        s = summary
        console.print(
            f"[bold]{s['tokens']:,}[/] tokens in {s['windows']:,} windows; [bold]{s['bytes_per_token']:.2f}[/] bytes/token "
            f"on disk ({s['payload_bytes_per_token']:.2f} in coded windows)",
            highlight=False,
        )
        console.print(
            f"compression: mean KL(original top-k ‖ stored) [bold]{s['kl_mean']:.2e}[/] nats (max {s['kl_max']:.2e}); "
            f"top-k keeps {s['mass_mean']:.1%} of the probability on average",
            highlight=False,
        )
        q = s["ce_quantiles"]
        console.print(
            f"CE of the next token: mean {s['ce_mean']:.3f} nats; quantiles "
            + ", ".join(f"{int(k * 100)}% {v:.2f}" for k, v in q.items() if not math.isnan(v)),
            highlight=False,
        )
        for line in _histogram(s["ce_hist"], ce_bin):
            console.print(line, highlight=False)
    for p in problems:
        console.print(f"[red]✗[/] {p}", highlight=False)
    if not problems:
        console.print("[green]✓ every shard present and intact[/]")
