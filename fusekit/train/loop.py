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
from fusekit.models.load import load_config, load_model, load_tokenizer
from fusekit.train.activation_checkpointing import enable_activation_checkpointing
import fusekit.train.model_card as model_card
import fusekit.train.tracking as tracking
from fusekit.train.config import TrainConfig, TrainConfigError, build_config
from fusekit.train.export import write_hf_model
from fusekit.train.data import DataPlan
from fusekit.train.source import check_target, default_workers, missing_mass, open_source
from fusekit.train.ddp import Dist, init_distributed, shard, under_torchrun
from fusekit.train.head import FusionStep
from fusekit.train.meta_init import build_sharded


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


def _check_out(out: Path, identity: dict, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to mix runs.

    `identity`: what the run must agree on with the one in OUT to continue it — `TrainConfig.identity()`,
    plus, for `fusekit distill`, its teachers, corpus and policy (`online.run_identity`). It is compared
    with the copy the finished run's `fusekit_train.json` or the last checkpoint holds; the first
    difference stops the run before anything is loaded, naming each differing key, old → new.
    """
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
        saved = {k: v for k, v in saved.items() if k not in TrainConfig.RESUMABLE_CHANGES}  # an earlier fusekit's
        now = identity
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


def _train(model_ref, aligned, out: Path, cfg: TrainConfig, resume, progress, device, d: Dist, source_factory=None,
           make_objective=None, identity_extra: dict | None = None, write_card=None) -> Path:
    """`source_factory(device, dist)`: the windows come from it instead of `aligned` (online distillation,
    `online.py`: teachers run beside the target); it is called before the target is loaded.
    `make_objective(plan, cfg, step_module)`: another objective than `FusionObjective` (on-policy).
    `identity_extra`: more keys a resumed run must agree on, beside the config's (`_check_out`); they are
    recorded with the config in every checkpoint and in `fusekit_train.json`.
    `write_card(out, cfg, steps, last, world_size)`: the model card (default: `write_fusion_card`'s)."""
    fsdp = cfg.fsdp and d.grouped
    if cfg.fsdp and not under_torchrun():
        raise TrainConfigError(
            "--fsdp shards the model over the processes torchrun starts: run `torchrun --nproc-per-node N "
            "--no-python fusekit train … --fsdp`, or leave out --fsdp to train in this one process"
        )
    if cfg.fsdp_offload and not cfg.fsdp:
        raise TrainConfigError("--fsdp-offload moves FSDP2's shards to host memory: use it with --fsdp under torchrun")
    run_identity = {**cfg.identity(), **(identity_extra or {})}
    start_ckpt = _check_out(out, run_identity, resume)
    if ckpt.read_done(out) is not None:
        return out  # finished earlier with the same options
    tracking.require(cfg.report_to)  # a missing tracking library fails now, not after loading the model
    dev = d.device(device)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and dev.type == "cuda")

    tokenizer = _maybe_tokenizer(model_ref)
    config = load_config(model_ref, trust_remote_code=False)
    identity = _target_identity(model_ref, config, tokenizer)
    global_batch = d.world_size * cfg.batch_size * cfg.grad_accum
    if start_ckpt is not None:
        _check_resumable(start_ckpt, model_ref, identity, global_batch, cfg, d)
    if source_factory is None:
        source = open_source(aligned)
        check_target(source, tokenizer, config, model_ref)
        without_mass = missing_mass(source, cfg.loss, cfg.uses_target)
        if without_mass and d.is_main:
            warnings.warn(without_mass, stacklevel=2)
    else:
        source = source_factory(dev, d)
    _seed_everything(cfg.seed)
    net, step_module = _build(model_ref, start_ckpt, cfg, dev, d, use_bf16)
    step_module.fused = _fused_head(step_module, cfg, dev, d)
    plan = DataPlan(
        source,
        max_length=cfg.max_length,
        piece_length=min(cfg.max_length, _context_length(config) or cfg.max_length),
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
        pack=_packing(step_module, d),
        workers=cfg.loader_workers if cfg.loader_workers is not None else default_workers(source),
    )
    settings = engine.EngineSettings(
        lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, warmup_ratio=cfg.warmup_ratio, clip=cfg.clip,
        bf16=use_bf16, fsdp=cfg.fsdp, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
        stop_after=cfg.stop_after, log_every=cfg.log_every, report_to=tuple(cfg.report_to),
        meta={"config": run_identity, "total_steps": plan.total_steps, "model": model_ref, "target": identity,
              "global_batch": global_batch},
    )

    def export(last: dict) -> None:
        _export(out, net, step_module, tokenizer, run_identity, plan, last, d, model_ref, fsdp)
        if d.is_main:
            if write_card is not None:
                write_card(out, cfg, plan.total_steps, last, d.world_size)
            else:
                model_card.write_fusion_card(out, model_ref, aligned, cfg, plan.total_steps, last, d.world_size)

    try:
        objective = make_objective(plan, cfg, step_module) if make_objective else FusionObjective(plan, cfg)
        engine.run(net, objective, out, settings, d, dev, step_module=step_module,
                   start=start_ckpt, progress=progress, export=export)
    except ckpt.CheckpointError as exc:
        raise TrainError(str(exc)) from None
    finally:
        plan.close()
    return out


def _build(model_ref: str, start: Path | None, cfg: TrainConfig, dev: torch.device, d: Dist, bf16: bool):
    """(the LM, the FusionStep that trains it) with the weights of `start` (a checkpoint) or of the target.

    Under FSDP2 the model is built on the meta device and sharded before any weight exists
    (`meta_init`): rank 0 reads the target or a whole checkpoint and broadcasts it; a sharded checkpoint
    is read by every rank, each its own part. Otherwise every rank loads the whole model.
    """
    fsdp = cfg.fsdp and d.grouped
    sharded_start = start is not None and ckpt.is_sharded(start)

    def prepare(lm: torch.nn.Module) -> FusionStep:
        lm.config.use_cache = False
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(lm)  # before sharding: FSDP2's hooks stay outside the recompute
        step = FusionStep(lm, fused=False, loss=cfg.loss, beta=cfg.loss_beta)
        return shard(step, dev, bf16=bf16, offload=cfg.fsdp_offload) if fsdp else step

    if fsdp:
        if sharded_start:
            net, step = build_sharded(start, d, dev, prepare=prepare, offload=cfg.fsdp_offload,
                                      weights=lambda lm, step: ckpt.load_model_shards(start, step, lm))
        else:
            net, step = build_sharded(start or model_ref, d, dev, prepare=prepare, offload=cfg.fsdp_offload)
    else:
        net = load_model(model_ref if start is None or sharded_start else start)
        step = prepare(net)
        if sharded_start:
            ckpt.load_model_shards(start, step, net)
        net.to(dev)
    net.train()
    return net, step


def _target_identity(model_ref: str, config, tokenizer) -> dict:
    """Fingerprints of the target (config + weight files' heads and tails) and of its tokenizer, which a
    checkpoint records so that resuming with another target is refused before any step."""
    from fusekit.models.identity import config_identity, model_fingerprint, tokenizer_fingerprint

    fast = tokenizer is not None and getattr(tokenizer, "backend_tokenizer", None) is not None
    return {
        "model": model_fingerprint(model_ref, config_identity(config)),
        "tokenizer": tokenizer_fingerprint(tokenizer) if fast else None,
    }


def _check_resumable(start: Path, model_ref: str, identity: dict, global_batch: int, cfg: TrainConfig, d: Dist) -> None:
    """Refuse a checkpoint of another target or tokenizer, or one whose steps held another number of rows.

    The number of ranks may change between runs; the rows of a step (ranks × batch size × grad accum) may
    not, since they define what a step is — so a run of 2 ranks with grad_accum 2 resumes on 4 ranks with
    grad_accum 1 or on 1 with grad_accum 4.
    """
    try:
        state = ckpt.read_state(start)
    except ckpt.CheckpointError as exc:
        raise TrainError(str(exc)) from None
    saved = state.get("target")
    if isinstance(saved, dict):
        trained_from = state.get("model", "another model")
        if saved.get("model") != identity["model"]:
            raise TrainError(
                f"{start} was trained from {trained_from}, and {model_ref} is another model (its config or weights "
                "differ): resume with the target it was trained from, or use another --out"
            )
        if saved.get("tokenizer") and identity["tokenizer"] and saved["tokenizer"] != identity["tokenizer"]:
            raise TrainError(
                f"{start} was trained with the tokenizer of {trained_from}, and {model_ref}'s differs: resume with "
                "the target (and tokenizer) it was trained from, or use another --out"
            )
    rows = state.get("global_batch")
    if rows is None:  # an earlier fusekit's checkpoint: it was resumable with the same grad_accum only
        old = state.get("config", {}).get("grad_accum", cfg.grad_accum)
        if old != cfg.grad_accum:
            raise TrainError(f"{start} was trained with grad_accum {old}: resume with --grad-accum {old}")
        return
    if rows != global_batch:
        per = d.world_size * cfg.batch_size
        hint = f" --grad-accum {rows // per}" if rows % per == 0 else f" a number of ranks × --batch-size that divides {rows}"
        raise TrainError(
            f"{start} was trained with {rows} rows per step (ranks × batch size × grad accum); here "
            f"{d.world_size} × {cfg.batch_size} × {cfg.grad_accum} = {global_batch}: resume on {d.world_size} "
            f"rank(s) with{hint} to continue the same run"
        )


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
        return batch.tokens  # the windows' tokens: padding is not counted

    def forward(self, model, batch, step: int, dev: torch.device):
        total, clm, fusion = model(
            torch.as_tensor(batch.input_ids, device=dev),
            torch.as_tensor(batch.position_ids, device=dev),
            torch.as_tensor(batch.labels, device=dev),
            None if batch.target_ids is None else torch.as_tensor(batch.target_ids, device=dev),
            None if batch.target_probs is None else torch.as_tensor(batch.target_probs, device=dev),
            self.cfg.lam_at(step, self.total_steps),
            None if batch.attention_mask is None else torch.as_tensor(batch.attention_mask, device=dev),
            None if batch.target_mass is None else torch.as_tensor(batch.target_mass, device=dev),
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


def _packing(step_module: FusionStep, d: Dist) -> bool:
    """Whether windows may share a row: the model keeps attention inside each packed window (the check
    extraction makes); warns when it falls back. Collective under FSDP2 (the probe runs the sharded model)."""
    ok = step_module.packing_supported()
    if not ok and d.is_main:
        warnings.warn(
            f"{type(step_module.lm).__name__} does not keep attention inside packed windows: training on one window per row, "
            "right-padded with an attention mask (more padding, same loss)", stacklevel=2,
        )
    return ok


def _fused_head(step_module: FusionStep, cfg: TrainConfig, dev: torch.device, d: Dist) -> bool:
    """Whether this run uses the chunked output layer + loss (`head.py`); warns when it falls back.
    Collective under FSDP2 (the probe runs the sharded model)."""
    if cfg.fused_head == "off":
        return False
    problem = step_module.head_problem(dev)
    if problem is None:
        return True
    msg = f"{type(step_module.lm).__name__}: {problem}"
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


def _export(out: Path, net, step_module, tokenizer, identity: dict, plan: DataPlan, last: dict, d: Dist,
            model_ref: str, sharded: bool) -> None:
    """The trained model as a Hugging Face folder in OUT (`export.write_hf_model`: no rank holds the whole
    model under FSDP2), its tokenizer and `fusekit_train.json` (with the run's `identity`, which a later
    `--resume` compares)."""
    write_hf_model(out, net, step_module, tokenizer, sharded, d)
    if d.is_main:
        ckpt.write_done(
            out,
            {
                "model": model_ref,
                "steps": plan.total_steps,
                "world_size": d.world_size,
                "final": last,
                "config": identity,
            },
        )
    d.barrier()
