"""`fusekit distill`: train the target with teachers run online (no extraction store), off- and on-policy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from fusekit.cli.app import app
from fusekit.cli.errors import handle_errors
from fusekit.cli.metavars import one_of
from fusekit.train.config import TrainConfig


@app.command("distill")
@handle_errors
def distill_command(
    model: str = typer.Option(..., "--model", "-m", metavar="MODEL", help="Target model: a model folder or a hub id (fast tokenizer)."),
    teacher: List[str] = typer.Option(..., "--teacher", "-t", metavar="MODEL", help="A teacher model (repeat for several); fused in this order."),
    data: Path = typer.Option(..., "--data", "-d", help="Corpus: a text file, a folder of them, JSONL or Parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Where checkpoints, metrics.jsonl and the trained model go."),
    field: str = typer.Option("text", help="JSONL/Parquet field holding the text."),
    top_k: int = typer.Option(10, "--top-k", help="Entries kept per position of every model's distribution."),
    on_policy_ratio: float = typer.Option(
        0.0, "--on-policy-ratio", help="GKD's mixing weight: share of micro-batches trained on the target's own samples "
        "of corpus prompts, scored by the teachers (0 = off-policy only, like FuseLLM)."
    ),
    prompt_share: float = typer.Option(0.5, "--prompt-share", help="On-policy: share of each corpus window kept as the prompt."),
    sample_temperature: float = typer.Option(1.0, "--sample-temperature", help="On-policy: temperature of the target's samples."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/TOML file of training options; flags override it."),
    fusion: Optional[str] = typer.Option(None, metavar="RULE", help="Fusion rule: min_ce (default) or avg_ce."),
    granularity: Optional[str] = typer.Option(None, metavar=one_of(TrainConfig, "granularity"), help="Decide per 'window' (FuseLLM, default) or per 'token'."),
    loss: Optional[str] = typer.Option(
        None, metavar=one_of(TrainConfig, "loss"), help="The fusion term: ce (default, FuseLLM's CE to the fused distribution), kl, reverse_kl, jsd (needs "
        "--jsd-beta), uld or gold, as for `fusekit train`; docs/TRAINING.md, Losses."
    ),
    jsd_beta: Optional[float] = typer.Option(None, help="β in (0, 1) of jsd (required) and gold (default 0.5)."),
    lam: Optional[float] = typer.Option(None, help="Weight λ of the CLM loss (default 0.9)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-5)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the data (default 1)."),
    batch_size: Optional[int] = typer.Option(None, help="Packed rows per micro-batch, per process (default 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step, per process (default 1)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per window and per packed row (default 2048)."),
    max_steps: Optional[int] = typer.Option(None, help="Cap on optimizer steps; the schedule spans them."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order, on-policy choices and sampling (default 0)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimizer steps (always at the end)."),
    fsdp: Optional[bool] = typer.Option(
        None, "--fsdp/--ddp", help="Under torchrun: shard the target with FSDP2 instead of DDP (off-policy only); each rank "
        "still runs whole teachers."
    ),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute each block's activations in backward."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT (same teachers, corpus, "
                                "top-k, loss and policy; anything else is refused, naming what differs)."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help="Device, e.g. cpu or cuda:0 (default: CUDA when present)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train MODEL on λ·CLM + (1−λ)·fusion with the TEACHERs run beside it over DATA (no extraction store).

    Each batch's texts go through every teacher (eval mode; bf16 on CUDA, fp32 on CPU), their top-k
    through the byte-span transfer onto the target's tokens and the fusion rule, as `fusekit extract` →
    `align` → `train` would. Each teacher's parameter memory is printed first; teachers that do not fit
    are refused before any step. Multi-GPU: torchrun --nproc-per-node N --no-python fusekit distill … (DDP;
    --fsdp to shard the target with FSDP2). On-policy chat data needs a chat template in every model.
    """
    from fusekit.train.online import distill

    options = dict(fusion=fusion, granularity=granularity, loss=loss, jsd_beta=jsd_beta, lam=lam, lr=lr, epochs=epochs,
                   batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, max_steps=max_steps, seed=seed,
                   save_every=save_every, fsdp=fsdp, gradient_checkpointing=gradient_checkpointing)
    result = distill(model, teacher, data, out, top_k=top_k, field=field, on_policy_ratio=on_policy_ratio,
                     prompt_share=prompt_share, sample_temperature=sample_temperature, config=config, resume=resume,
                     progress=progress, device=device, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        Console(stderr=True).print(f"trained model in {result}", highlight=False)
