"""Fusion training: λ·CLM + (1−λ)·fusion on aligned windows, run by the training engine (`engine.py`).

This module checks the output folder and the data, loads the target, and describes the objective (what a
micro-batch is, how its loss and metrics are computed); the step loop itself — accumulation, DDP/FSDP,
clipping, schedule, checkpoints, metrics — is `engine.run`, shared with the implicit-fusion stages.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fusekit.store.types import AlignedWindow
import fusekit.train.checkpoint as ckpt
import fusekit.train.engine as engine
import fusekit.train.model_card as model_card
import fusekit.train.tracking as tracking
from fusekit.train.config import TrainConfig, TrainConfigError, build_config
from fusekit.train.data import DataPlan, check_target, open_source
from fusekit.train.ddp import Dist, init_distributed
from fusekit.train.head import FusionStep, head_problem
from fusekit.models.load import load_model, load_tokenizer, quiet_transformers


class TrainError(RuntimeError):
    """A training run that cannot start or continue, with what to do about it."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_out(out: Path, cfg: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to mix runs."""
    done = ckpt.read_done(out)
    found = ckpt.list_checkpoints(out)
    if not resume and (done or found):
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    saved = done["config"] if done else None
    if found and saved is None:
        try:
            saved = ckpt.read_state(found[-1])["config"]
        except ckpt.CheckpointError as exc:
            raise TrainError(str(exc)) from None
    if saved is not None:
        now = cfg.identity()
        diff = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
            raise TrainError(f"{out} holds a run with other options ({detail}); resume with the same options or use another --out")
    return found[-1] if found else None


def train(
    model: str | Path,
    aligned: str | Path | Iterable[AlignedWindow],
    out: str | Path,
    *,
    config: TrainConfig | str | Path | dict | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    **options: Any,
) -> Path:
    """Fuse the aligned candidates and train MODEL on λ·CLM + (1−λ)·fusion; returns OUT (the trained model).

    `aligned` is an aligned store folder (from `fusekit align`) or an iterable of AlignedWindows.
    Options (`lam`, `lr`, `fusion`, …) are TrainConfig fields; they override `config`, which may be a
    TrainConfig, a mapping or a YAML/TOML file. With `resume=True` training continues from the last
    checkpoint in OUT (or returns at once if OUT holds a finished run with the same options).
    """
    cfg = build_config(config, **options)
    return _train(str(model), aligned, Path(out), cfg, resume, progress, device, init_distributed())


def _train(model_ref, aligned, out: Path, cfg: TrainConfig, resume, progress, device, d: Dist) -> Path:
    start_ckpt = _check_out(out, cfg, resume)
    if ckpt.read_done(out) is not None:
        return out  # finished earlier with the same options
    tracking.require(cfg.report_to)  # a missing tracking library fails now, not after loading the model
    dev = d.device(device)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and dev.type == "cuda")
    _seed_everything(cfg.seed)

    net = load_model(start_ckpt or model_ref)
    tokenizer = _maybe_tokenizer(model_ref)
    net.config.use_cache = False
    plan = DataPlan(
        open_source(aligned),
        max_length=cfg.max_length,
        piece_length=min(cfg.max_length, _context_length(net.config) or cfg.max_length),
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        epochs=cfg.epochs,
        world_size=d.world_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        max_steps=cfg.max_steps,
        fusion=cfg.fusion,
        granularity=cfg.granularity,
        with_target=cfg.uses_target,
        temperature=cfg.teacher_temperature,
        require_loss_mask=cfg.loss_on == "assistant",
    )
    check_target(plan.source, tokenizer, net.config, model_ref)
    net.to(dev).train()
    settings = engine.EngineSettings(
        lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, warmup_ratio=cfg.warmup_ratio, clip=cfg.clip,
        bf16=use_bf16, fsdp=cfg.fsdp, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
        stop_after=cfg.stop_after, log_every=cfg.log_every, report_to=tuple(cfg.report_to),
        meta={"config": cfg.identity(), "total_steps": plan.total_steps, "model": model_ref},
    )
    step_module = FusionStep(net, _fused_head(net, cfg, dev, d))

    def export(state: dict | None, last: dict) -> None:
        _export(out, net, state, tokenizer, cfg, plan, last, d, model_ref)
        if d.is_main:
            model_card.write_fusion_card(out, model_ref, aligned, cfg, plan.total_steps, last, d.world_size)

    try:
        engine.run(net, FusionObjective(plan, cfg), out, settings, d, dev, step_module=step_module,
                   start=start_ckpt, progress=progress, export=export)
    except ckpt.CheckpointError as exc:
        raise TrainError(str(exc)) from None
    return out


class FusionObjective:
    """λ·CLM + (1−λ)·fusion over a DataPlan's packed windows; the loss is summed over label tokens."""

    sums = ("loss", "clm", "fusion")

    def __init__(self, plan: DataPlan, cfg: TrainConfig):
        self.plan, self.cfg = plan, cfg
        self.total_steps = plan.total_steps

    def micro_batches(self, step: int, rank: int) -> list:
        plan = self.plan
        return [plan.micro_batch(i) if i is not None else plan.empty_batch() for i in plan.micro_indices(step, rank)]

    def units(self, batch) -> float:
        return batch.label_tokens

    def tokens(self, batch) -> int:
        return batch.tokens

    def forward(self, model, batch, step: int, dev: torch.device):
        total, clm, fusion = model(
            torch.as_tensor(batch.input_ids, device=dev),
            torch.as_tensor(batch.position_ids, device=dev),
            torch.as_tensor(batch.labels, device=dev),
            None if batch.target_ids is None else torch.as_tensor(batch.target_ids, device=dev),
            None if batch.target_probs is None else torch.as_tensor(batch.target_probs, device=dev),
            self.cfg.lam_at(step, self.total_steps),
        )
        return total, torch.stack([total.detach(), clm, fusion])

    def report(self, sums: list[float], units: float, step: int) -> dict:
        total, clm, fusion = sums
        return {
            "loss": total / max(units, 1.0),
            "clm": clm / max(units, 1.0),
            "fusion": fusion / max(units, 1.0) if self.cfg.uses_target else None,
            "lam": self.cfg.lam_at(step, self.total_steps),
        }


def _fused_head(net, cfg: TrainConfig, dev: torch.device, d: Dist) -> bool:
    """Whether this run uses the chunked output layer + loss (`head.py`); warns when it falls back."""
    if cfg.fused_head == "off":
        return False
    problem = head_problem(net, dev)
    if problem is None:
        return True
    msg = f"{type(net).__name__}: {problem}"
    if cfg.fused_head == "on":
        raise TrainConfigError(f"fused_head on: {msg}; train with fused_head auto or off")
    if d.is_main:
        warnings.warn(f"{msg}: training through full [B, L, V] logits (more memory)", stacklevel=2)
    return False


def _maybe_tokenizer(model_ref: str):
    try:
        return load_tokenizer(model_ref)
    except Exception:  # a weights-only folder: the trained model is still usable with its tokenizer
        return None


def _export(out: Path, net, state: dict | None, tokenizer, cfg: TrainConfig, plan: DataPlan, last: dict, d: Dist, model_ref: str) -> None:
    if d.is_main:
        with quiet_transformers():
            net.save_pretrained(out, safe_serialization=True, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        ckpt.write_done(
            out,
            {
                "model": model_ref,
                "steps": plan.total_steps,
                "world_size": d.world_size,
                "final": last,
                "config": cfg.identity(),
            },
        )
    d.barrier()
