"""`fusekit merge`: merge fine-tuned models in parameter space (VaRM, SCE, TIES, DARE, DELLA, SLERP, …), from
flags or a mergekit YAML as-is."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fusekit.cli.app import app
from fusekit.cli.errors import fail, handle_errors


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"--{what} takes numbers separated by commas, e.g. 0.6,0.4; got {text!r}")


def _print_methods(console: Console) -> None:
    from fusekit.merge import METHODS

    table = Table(title="merge methods (parameters under mergekit's names; per model: *)")
    for col in ("method", "name", "parameters"):
        table.add_column(col)
    table.add_column("paper", overflow="fold")
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        glob, per_model = m.parameter_names()
        names = [f"{p}*" for p in per_model] + [p for p in glob if p != "int8_mask"]
        table.add_row(m.name, m.pretty_name, ", ".join(names) or "–", m.reference)
    console.print(table)


def _print_varm(console: Console, result, full: bool) -> None:
    report = result.varm
    frame = report.frame() if full else report.by_layer()
    table = Table(title=f"VaRM weights ({'per tensor' if full else 'mean per layer'})")
    key = "name" if full else "group"
    table.add_column(key)
    if not full:
        table.add_column("tensors", justify="right")
    table.add_column("unchanged", justify="right")
    for j, model in enumerate(report.models):
        table.add_column(f"w{j + 1} {Path(model).name}", justify="right")
    for row in frame.iter_rows(named=True):
        cells = [row[key]]
        if not full:
            cells.append(str(row["tensors"]))
        cells.append(str(int(row["unchanged"])))
        cells += [f"{row[f'w_{j + 1}']:.3f}" for j in range(len(report.models))]
        table.add_row(*cells)
    console.print(table)


@app.command("merge")
@handle_errors
def merge_command(
    base: Optional[str] = typer.Option(None, "--base", "-b", help="The base (FuseChat: the pivot) the models were fine-tuned from; an HF folder."),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", metavar="MODEL", help="A model to merge (HF folder); repeat for each."),
    method: Optional[str] = typer.Option(None, "--method", help="varm (default), sce, linear, task_arithmetic, ties, dare_ties, dare_linear, della, della_linear, breadcrumbs, breadcrumbs_ties, model_stock, slerp or nuslerp (--list-methods)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (HF model: safetensors + the base's config and tokenizer)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML merge config: a mergekit configuration as-is (gradients, filters, slices) or fusekit's spelling; flags override it."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per model, comma-separated (linear, task_arithmetic, ties, dare_*, della*, breadcrumbs*, nuslerp)."),
    density: Optional[str] = typer.Option(None, "--density", help="Share of each task vector kept (ties: default 0.2; dare_*, della*, breadcrumbs*: required); one value or one per model."),
    t: Optional[float] = typer.Option(None, "--t", help="slerp: interpolation from the first model (0) to the second (1); default 0.5."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Scale of the merged task vector (task_arithmetic, ties, dare_*); default 1."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="Divide by the sum of weights (defaults as mergekit: on for linear and ties)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of DARE's and DELLA's drop masks (default 0)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of float tensors (default: the base's), e.g. bfloat16."),
    tokenizer_source: Optional[str] = typer.Option(None, "--tokenizer-source", help="base (default), union or a model folder: whose tokenizer to ship (one vocabulary only)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest output shard, e.g. 5GB (default) or 500MB."),
    allow_dtype_mismatch: bool = typer.Option(False, "--allow-dtype-mismatch", help="Merge models saved in different float dtypes."),
    device: str = typer.Option("cpu", "--device", help="Where the arithmetic runs: cpu or cuda[:N]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the weights already in OUT."),
    full: bool = typer.Option(False, "--full", help="VaRM: print the weight of every tensor, not the per-layer means."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the merge methods and exit."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Merge MODELs fine-tuned from BASE into OUT, one tensor at a time.

    FuseChat: fusekit merge --base pivot --model fused_1 --model fused_2 --method varm --out merged
    mergekit: fusekit merge --config mergekit.yml --out merged
    """
    console = Console()
    if list_methods:
        _print_methods(console)
        return
    from fusekit.merge import MergeWarning, merge_models
    from fusekit.merge.options import resolve_request

    dens = _floats(density, "density")
    request = resolve_request(
        base, model, method, out, config=config, weights=_floats(weights, "weights"),
        density=(dens[0] if dens and len(dens) == 1 else dens), seed=seed, t=t, lam=lam, normalize=normalize,
        dtype=dtype, tokenizer_source=tokenizer_source, max_shard_size=max_shard_size, allow_dtype_mismatch=allow_dtype_mismatch, device=device,
        overwrite=overwrite, progress=progress and not as_json,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        result = merge_models(**request)
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    gb = result.bytes_read / 1e9
    if as_json:
        summary = {
            "out": str(result.out), "method": result.method, "tensors": result.tensors, "seconds": result.seconds,
            "gb_read": gb, "shards": [p.name for p in result.shards],
        }
        if result.varm is not None:
            summary["varm_weights"] = str(result.out / "varm_weights.json")
        typer.echo(json.dumps(summary, indent=2))
        return
    if result.varm is not None:
        _print_varm(console, result, full)
        console.print(f"per-tensor weights: {result.out / 'varm_weights.json'}", highlight=False)
    console.print(
        f"{result.method}: {result.tensors} tensors, {gb:.2f} GB read in {result.seconds:.1f} s "
        f"({gb / max(result.seconds, 1e-9):.2f} GB/s) → {result.out}",
        highlight=False,
    )
