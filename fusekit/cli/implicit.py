"""`fusekit implicit CONFIG`: implicit model fusion (FuseChat-3.0) — sample, score, build, SFT, DPO, eval."""

from __future__ import annotations

from pathlib import Path

import typer

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors


@app.command("implicit")
@handle_errors
def implicit_command(
    config: Path = typer.Argument(..., help="Implicit-fusion YAML: workdir, target, sources, prompts, eval, sample, reward, build, sft, dpo."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show stage headers and training progress."),
    backend: str = typer.Option(
        None, "--backend", help="Sampling backend, overriding sample.backend: auto (vLLM where installed with a CUDA GPU), transformers or vllm."
    ),
    report_to: str = typer.Option(
        None, "--report-to", help="Log the SFT and DPO stages' every step to tensorboard, wandb and/or mlflow (comma-separated; "
        "overrides sft.report_to and dpo.report_to; pip install 'fusekit[track]')."
    ),
) -> None:
    """Implicit fusion (FuseChat-3.0): every source answers every prompt n times, a reward function or
    model scores the answers, the target is fine-tuned on the best ones (SFT) and then on best-vs-worst
    pairs of one source (DPO, the SFT model as reference).

    Writes WORKDIR/responses.parquet, sft.parquet, pairs.parquet, sft/model, dpo/model, results.json
    and results.png. Re-running resumes: finished stages are skipped.
    """
    from rich.console import Console

    from fusekit.implicit.run import implicit_fusion

    from fusekit.implicit.evaluate import results_table

    if backend is not None:
        from fusekit.implicit.vllm_backend import BACKENDS

        if backend not in BACKENDS:
            raise typer.BadParameter(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend is None and report_to is None:
        result = implicit_fusion(config, progress=progress)
    else:
        from fusekit.implicit.config import load_implicit
        from fusekit.train.tracking import parse_report_to

        loaded = load_implicit(config)
        if backend is not None:
            loaded = loaded.model_copy(update={"sample": loaded.sample.model_copy(update={"backend": backend})})
        if report_to is not None:
            trackers = parse_report_to(report_to)
            loaded = loaded.model_copy(update={stage: getattr(loaded, stage).model_copy(update={"report_to": trackers}) for stage in ("sft", "dpo")})
        result = implicit_fusion(loaded, progress=progress, config_dir=config.resolve().parent)
    if result["eval"]:
        Console().print(results_table(result["eval"]))
    if result["score"]["failed"]:
        Console(stderr=True).print(f"reward failed for {result['score']['failed']} responses (skipped); see results.json → score")
    Console(stderr=True).print(f"fused model: {result['models']['dpo']}")
