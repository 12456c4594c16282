"""The training loop, nanoGPT-style: batches, forward, loss, backward, clip, step, schedule, checkpoint.

One function, read top to bottom. The distributed branch is the `d.enabled` lines; everything else is
the same for 1 process and for N.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fusekit.store.types import AlignedWindow
from fusekit.train import checkpoint as ckpt
from fusekit.train.config import TrainConfig, TrainConfigError, build_config
from fusekit.train.data import DataPlan, check_target, open_source
from fusekit.train.ddp import Dist, gradient_sync, init_distributed, wrap
from fusekit.train.head import FusionStep, head_problem
from fusekit.model_io import load_model, load_tokenizer, quiet_transformers
from fusekit.train.progress import TrainProgress

METRICS_FILE = "metrics.jsonl"


class TrainError(RuntimeError):
    """A training run that cannot start or continue, with what to do about it."""


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """lr multiplier: linear warm-up over ⌈ratio·total⌉ steps, then cosine decay to 0 (as HF's schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Matrices decay; biases and norm gains do not (as nanoGPT and HF's Trainer).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


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
    fsdp = cfg.fsdp and d.enabled
    model = wrap(FusionStep(net, _fused_head(net, cfg, dev, d)), d, dev, fsdp)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(plan.total_steps, cfg.warmup_ratio))
    step = 0
    if start_ckpt is not None:
        try:
            state, rng = ckpt.load_trainer_state(start_ckpt, d)
        except ckpt.CheckpointError as exc:
            raise TrainError(str(exc)) from None
        ckpt.load_optimizer(model, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if d.is_main:
            print(f"resuming {out} from step {step} of {plan.total_steps} ({start_ckpt})", file=sys.stderr, flush=True)
        if rng is not None:
            ckpt.set_rng_state(rng)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    metrics = _open_metrics(out, step, d)
    meta = {"config": cfg.identity(), "total_steps": plan.total_steps, "model": model_ref}
    bar = TrainProgress(plan.total_steps, step, enabled=progress and d.is_main)
    last: dict[str, float] = {}
    started, steps_here, tokens_here = time.perf_counter(), 0, 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def load(s: int):
        return [plan.micro_batch(i) if i is not None else plan.empty_batch() for i in plan.micro_indices(s, d.rank)]

    # One worker thread reads and fuses the next step's windows while this step computes; batches are a
    # pure function of the step, so the overlap changes nothing in the result.
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, step) if step < plan.total_steps else None
        while step < plan.total_steps:
            t0 = time.perf_counter()
            batches = pending.result()
            if step + 1 < plan.total_steps:
                pending = pool.submit(load, step + 1)
            local_tokens = sum(b.label_tokens for b in batches)
            count = d.sum([local_tokens], dev)[0]
            # Sum over tokens / tokens in the whole step; DDP averages over ranks, hence × world size.
            scale = d.world_size / max(count, 1.0)
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
            lam = cfg.lam_at(step, plan.total_steps)
            for g, batch in enumerate(batches):
                syncing = g == len(batches) - 1 or not d.enabled
                with gradient_sync(model, syncing):
                    with autocast:
                        total, clm, fusion = model(
                            torch.as_tensor(batch.input_ids, device=dev),
                            torch.as_tensor(batch.position_ids, device=dev),
                            torch.as_tensor(batch.labels, device=dev),
                            None if batch.target_ids is None else torch.as_tensor(batch.target_ids, device=dev),
                            None if batch.target_probs is None else torch.as_tensor(batch.target_probs, device=dev),
                            lam,
                        )
                    (total * scale).backward()
                sums += torch.stack([total.detach(), clm, fusion]).double()
            if fsdp:
                # DTensor gradients: the norm over every rank's shard (inf: measure without clipping).
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            elif cfg.clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_here += 1

            total, clm, fusion, tokens = d.sum([*sums.tolist(), float(sum(b.tokens for b in batches))], dev)
            tokens_here += int(tokens)
            dt = time.perf_counter() - t0
            last = {
                "step": step,
                "loss": total / max(count, 1.0),
                "clm": clm / max(count, 1.0),
                "fusion": fusion / max(count, 1.0) if cfg.uses_target else None,
                "lam": lam,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": int(tokens),
                "tokens_per_s": tokens / dt if dt > 0 else None,
                "elapsed_s": time.perf_counter() - started,
            }
            if metrics is not None and (step % cfg.log_every == 0 or step == plan.total_steps):
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            bar.update(step, last)
            stopping = cfg.stop_after is not None and steps_here >= cfg.stop_after and step < plan.total_steps
            if step == plan.total_steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
                ckpt.save_checkpoint(out, step, net, model, optimizer, scheduler, meta, d, cfg.keep_checkpoints, fsdp)
            if stopping:
                break

    if metrics is not None:
        metrics.close()
    last["run"] = _run_figures(dev, tokens_here, time.perf_counter() - started, steps_here)
    if step == plan.total_steps:
        _export(out, net, model, tokenizer, cfg, plan, last, d, model_ref)
    return out


def _run_figures(dev: torch.device, tokens: int, seconds: float, steps: int) -> dict:
    """This invocation's throughput (all ranks' tokens) and this process's peak memory."""
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda max_memory_allocated"
    else:
        from fusekit._procmem import memory_mb

        peak, kind = memory_mb()["VmHWM"], "process peak RSS"
    return {
        "steps": steps,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "peak_memory_mib": peak,
        "peak_memory_kind": kind,
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


def _open_metrics(out: Path, step: int, d: Dist):
    """The metrics log, truncated to the resumed step so a resumed run's log equals an uninterrupted one."""
    if not d.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / METRICS_FILE
    kept = []
    if step and path.is_file():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    f = path.open("w")
    f.writelines(ln + "\n" for ln in kept)
    return f


def _export(out: Path, net, model, tokenizer, cfg: TrainConfig, plan: DataPlan, last: dict, d: Dist, model_ref: str) -> None:
    state, _ = ckpt.full_state_dicts(model, None, cfg.fsdp and d.enabled)
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
