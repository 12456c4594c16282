"""`fusekit train`: fuse the aligned candidates and train the target (λ·CLM + (1−λ)·fusion)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors
from fusekit.cli.metavars import one_of
from fusekit.train.config import TrainConfig


@app.command("train")
@handle_errors
def train_command(
    model: str = typer.Option(..., "--model", "-m", metavar="MODEL", help="Target model: a model folder, a .gguf file or a hub id."),
    aligned: Path = typer.Option(..., "--aligned", "-a", help="Aligned store folder written by `fusekit align`."),
    out: Path = typer.Option(..., "--out", "-o", help="Where checkpoints, metrics.jsonl and the trained model go."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/TOML file of training options; flags override it."),
    preset: Optional[str] = typer.Option(
        None, metavar=one_of(TrainConfig, "preset"), help="The paper's recipe for every option left unset: fusellm (default: λ 0.9, lr 1e-5, 1 epoch, wd 0.1, "
        "warm-up 0.8 %, β2 0.95) or fusechat (lr 5e-6, 3 epochs, wd 0, warm-up 3 %, β2 0.999, assistant tokens only)."
    ),
    fusion: Optional[str] = typer.Option(None, metavar="RULE", help="Fusion rule: min_ce (default) or avg_ce."),
    granularity: Optional[str] = typer.Option(None, metavar=one_of(TrainConfig, "granularity"), help="Decide per 'window' (FuseLLM, default) or per 'token'."),
    loss: Optional[str] = typer.Option(
        None, metavar=one_of(TrainConfig, "loss"), help="The fusion term: ce (default, FuseLLM's CE to the fused distribution), kl, reverse_kl, jsd (needs "
        "--jsd-beta), uld (sorted-probability L1) or gold (JSD on mapped ids + ULD on the rest); docs/TRAINING.md, Losses."
    ),
    jsd_beta: Optional[float] = typer.Option(
        None, help="β in (0, 1) of jsd (required) and gold (default 0.5): mixture M = β·teacher + (1−β)·student (TRL's convention)."
    ),
    lam: Optional[float] = typer.Option(None, help="Weight λ of the CLM loss (default 0.9); 1.0 = CLM-only baseline."),
    lam_schedule: Optional[str] = typer.Option(
        None, metavar=one_of(TrainConfig, "lam_schedule"), help="λ over the run: constant (default), linear (lam → --lam-end) or hard_and_decay (lam → 1, FuseAI's rule)."
    ),
    lam_end: Optional[float] = typer.Option(None, help="λ at the end of a linear schedule (default 1.0)."),
    teacher_temperature: Optional[float] = typer.Option(
        None, help="Temperature of the fused target: p ∝ p^(1/T) over its ids (default 1.0)."
    ),
    loss_on: Optional[str] = typer.Option(None, metavar=one_of(TrainConfig, "loss_on"), help="all tokens, or assistant tokens only (chat data; needs loss masks)."),
    fused_head: Optional[str] = typer.Option(
        None, metavar=one_of(TrainConfig, "fused_head"), help="auto (default): output layer + loss in chunks, no [B, L, V] logits, where the model allows; on; off."
    ),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-5)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the data (default 1; fractions allowed)."),
    batch_size: Optional[int] = typer.Option(None, help="Packed rows per micro-batch, per process (default 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step, per process (default 1)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per packed row (default 2048)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Share of steps for linear warm-up (default 0.008)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0.1)."),
    clip: Optional[float] = typer.Option(None, help="Max gradient norm (default 1.0; 0 = off)."),
    dtype: Optional[str] = typer.Option(None, metavar=one_of(TrainConfig, "dtype"), help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order and initialisation-time randomness (default 0)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimizer steps (always at the end)."),
    max_steps: Optional[int] = typer.Option(None, help="Cap on optimizer steps; the schedule spans them."),
    stop_after: Optional[int] = typer.Option(None, help="Checkpoint and stop after N steps of this invocation (for time-limited jobs)."),
    fsdp: Optional[bool] = typer.Option(
        None, "--fsdp/--ddp", help="Under torchrun: shard the model with FSDP2 (per transformer block) instead of DDP; "
        "no rank but rank 0 ever holds the whole model."
    ),
    fsdp_offload: Optional[bool] = typer.Option(
        None, "--fsdp-offload/--no-fsdp-offload", help="With --fsdp: keep shards, gradients and optimizer state in host memory."
    ),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each transformer block's activations in backward: far less memory, ~1/3 more compute, same numbers.",
    ),
    loader_workers: Optional[int] = typer.Option(
        None, help="Processes per rank that decode and fuse the aligned store ahead (default: by the cores per rank; 0 = none)."
    ),
    report_to: Optional[str] = typer.Option(
        None, "--report-to", metavar=one_of(TrainConfig, "report_to"), help="Also log every step's metrics and the config to tensorboard, wandb and/or mlflow "
        "(comma-separated; default none; pip install 'fusekit[track]'). W&B runs offline and MLflow writes OUT/mlruns unless configured."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help="Device, e.g. cpu or cuda:0 (default: CUDA when present)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train MODEL on λ·CLM + (1−λ)·fusion loss over the aligned store; the model ends up in OUT.

    Multi-GPU: torchrun --nproc-per-node N --no-python fusekit train … (DDP; --fsdp to shard with FSDP2,
    --gradient-checkpointing for long rows or large targets).
    At the end it prints tokens/s and peak memory.
    """
    from fusekit.train import train
    from fusekit.train.tracking import parse_report_to

    options = dict(
        preset=preset, lam_schedule=lam_schedule, lam_end=lam_end, teacher_temperature=teacher_temperature,
        loss_on=loss_on, fused_head=fused_head, fusion=fusion, loss=loss, jsd_beta=jsd_beta, granularity=granularity, lam=lam, lr=lr, epochs=epochs, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        clip=clip, dtype=dtype, seed=seed, save_every=save_every, max_steps=max_steps, stop_after=stop_after,
        fsdp=fsdp, fsdp_offload=fsdp_offload, gradient_checkpointing=gradient_checkpointing, loader_workers=loader_workers,
        report_to=parse_report_to(report_to) if report_to is not None else None,
    )
    result = train(model, aligned, out, config=config, resume=resume, progress=progress, device=device, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        done_file = result / "fusekit_train.json"
        console = Console(stderr=True)
        if done_file.is_file():
            run = json.loads(done_file.read_text()).get("final", {}).get("run")
            if run and run.get("steps"):
                tps = run["tokens_per_s"]
                console.print(
                    f"{run['steps']} steps: {tps:,.0f} tokens/s, peak memory {run['peak_memory_mib']:,.0f} MiB "
                    f"({run['peak_memory_kind']})" if tps else f"peak memory {run['peak_memory_mib']:,.0f} MiB",
                    highlight=False,
                )
            console.print(f"trained model in {result}", highlight=False)
        else:
            console.print(f"stopped at a checkpoint in {result}/checkpoints; re-run with --resume", highlight=False)
