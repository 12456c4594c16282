"""The training engine: one step loop for every objective (fusion training, SFT, DPO/WRPO).

Read top to bottom, one optimizer step is: the step's micro-batches (read by a worker thread while the
previous step computes), forward + backward of each (gradients accumulate, DDP/FSDP sync on the last
one), clip, AdamW step, schedule step, metrics line, progress bar, checkpoint. What a micro-batch is and
how its loss is computed belongs to the `Objective`; everything else lives here, once.

Loss scaling: an objective returns the *sum* of its loss over its normalising units (label tokens for
CLM/fusion, pairs for DPO) and says how many units each micro-batch holds; the engine divides by the
units of the whole step over all ranks. So gradient accumulation and data parallelism change nothing
in the result: 2 processes × 1 micro-batch equal 1 process × 2 micro-batches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

import fusekit.train.checkpoint as ckpt
import fusekit.train.tracking as tracking
from fusekit.train.ddp import Dist, gradient_sync, wrap
from fusekit.train.progress import TrainProgress

METRICS_FILE = "metrics.jsonl"


class Objective(Protocol):
    """What the engine trains on: the batches of each step and the loss of one micro-batch.

    `total_steps` optimizer steps; `sums` names the per-micro-batch sums that `forward` returns
    (the first is the loss). Every method but `forward` may run in a worker thread.
    """

    total_steps: int
    sums: Sequence[str]

    def micro_batches(self, step: int, rank: int) -> list[Any]:
        """This rank's micro-batches for optimizer step `step` (0-based); a pure function of (step, rank)."""

    def units(self, batch: Any) -> float:
        """How many normalising units (label tokens, pairs, …) the micro-batch's loss sum covers."""

    def tokens(self, batch: Any) -> int:
        """Tokens read by the micro-batch (throughput figures only)."""

    def forward(self, model: torch.nn.Module, batch: Any, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the batch's units — it carries the graph, detached sums [len(sums)], the loss first)."""

    def report(self, sums: list[float], units: float, step: int) -> dict[str, Any]:
        """The metrics of optimizer step `step` (0-based) from the step's sums over all ranks: at least `loss`."""

    # Optional: `prepare(model, batches, step, device)` → the batches to train on, called in the training
    # thread before `units` with the weights of the step (on-policy distillation samples there).


@dataclass
class EngineSettings:
    """Optimizer, schedule and bookkeeping options (TrainConfig's, or a fine-tuning stage's)."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.0
    clip: float = 1.0
    bf16: bool = False  # bf16 autocast around each forward
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    save_every: int | None = None
    keep_checkpoints: int = 2
    checkpoint_at_end: bool = True  # also checkpoint the last step (fusion keeps it; a stage may not need it)
    stop_after: int | None = None  # checkpoint and stop after this many steps in this invocation
    log_every: int = 1
    meta: dict = field(default_factory=dict)  # stored in every checkpoint's trainer state
    report_to: tuple[str, ...] = ()  # tracking back-ends (`tracking.py`): tensorboard, wandb, mlflow


@dataclass
class EngineResult:
    step: int  # optimizer steps done in all (this invocation and the ones it resumed)
    finished: bool  # step == total_steps
    last: dict  # the last step's metrics, with "run": this invocation's throughput and peak memory


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """lr multiplier: linear warm-up over ⌈ratio·total⌉ steps, then cosine decay to 0 (as HF's schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Matrices decay; biases and norm gains do not (as nanoGPT and HF's Trainer).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def read_metrics(out: Path) -> list[dict]:
    """The metrics lines of a run in OUT (empty when there are none)."""
    path = Path(out) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def run(
    net: torch.nn.Module,
    objective: Objective,
    out: Path,
    settings: EngineSettings,
    d: Dist,
    device: torch.device,
    *,
    step_module: torch.nn.Module | None = None,
    start: Path | None = None,
    progress: bool = True,
    export: Callable[[dict], None] | None = None,
) -> EngineResult:
    """Train `net` on `objective` from step 0, or from checkpoint `start` (whose weights `net` already holds).

    `net` is the model that is saved (`save_pretrained`); `step_module` (default `net`) is what
    `objective.forward` calls, wrapped here in DDP/FSDP under torchrun. OUT receives metrics.jsonl
    (truncated to the resumed step, so a resumed log equals an uninterrupted one) and checkpoints
    (OUT/checkpoints/step-N; `checkpoint.py`: each rank writes its part, nothing is gathered). When the
    last step is done, `export(last_metrics)` runs on every rank (it writes `net`, sharded or not).
    Raises CheckpointError for a checkpoint that cannot be resumed from.
    """
    total_steps = objective.total_steps
    fsdp = settings.fsdp and d.grouped
    model = wrap(step_module if step_module is not None else net, d, device, fsdp, bf16=settings.bf16)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, settings.warmup_ratio))
    step = 0
    if start is not None:
        state, rng = ckpt.load_trainer_state(start, d)
        ckpt.load_optimizer(start, model, optimizer, state, fsdp)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if d.is_main:
            print(f"resuming {out} from step {step} of {total_steps} ({start})", file=sys.stderr, flush=True)
        if rng is not None:
            ckpt.set_rng_state(rng)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else nullcontext()
    metrics = _open_metrics(out, step, d)
    tracker = tracking.open_tracker(settings.report_to, out, {"report_to": list(settings.report_to), **settings.meta}, step, d.is_main)
    bar = TrainProgress(total_steps, step, enabled=progress and d.is_main)
    last: dict[str, Any] = {}
    started, steps_here, tokens_here = time.perf_counter(), 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # One worker thread reads the next step's batches while this step computes; batches are a pure
    # function of the step, so the overlap changes nothing in the result.
    with bar, tracker, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(objective.micro_batches, step, d.rank) if step < total_steps else None
        while step < total_steps:
            t0 = time.perf_counter()
            batches = pending.result()
            if step + 1 < total_steps:
                pending = pool.submit(objective.micro_batches, step + 1, d.rank)
            if hasattr(objective, "prepare"):
                batches = objective.prepare(model, batches, step, device)
            units = d.sum([sum(objective.units(b) for b in batches)], device)[0]
            # Sum over units / units in the whole step; DDP averages over ranks, hence × world size.
            scale = d.world_size / max(units, 1.0)
            sums = torch.zeros(len(objective.sums), dtype=torch.float64, device=device)
            for g, batch in enumerate(batches):
                syncing = g == len(batches) - 1 or not d.enabled
                with gradient_sync(model, syncing):
                    with autocast:
                        loss, parts = objective.forward(model, batch, step, device)
                    (loss * scale).backward()
                sums += parts.double()
            grad_norm = _clip(params, settings.clip, fsdp)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_here += 1

            *totals, tokens = d.sum([*sums.tolist(), float(sum(objective.tokens(b) for b in batches))], device)
            tokens_here += int(tokens)
            dt = time.perf_counter() - t0
            last = {
                "step": step,
                **objective.report(totals, units, step - 1),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": int(tokens),
                "tokens_per_s": tokens / dt if dt > 0 else None,
                "elapsed_s": time.perf_counter() - started,
                "peak_memory_mib": _peak_memory_mib(device),
            }
            if metrics is not None and (step % settings.log_every == 0 or step == total_steps):
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                tracker.log(step, last)
            bar.update(step, last)
            stopping = settings.stop_after is not None and steps_here >= settings.stop_after and step < total_steps
            periodic = settings.save_every and step % settings.save_every == 0
            if (step == total_steps and settings.checkpoint_at_end) or stopping or (periodic and step < total_steps):
                ckpt.save_checkpoint(out, step, net, model, optimizer, scheduler, settings.meta, d, settings.keep_checkpoints, fsdp)
            if stopping:
                break
        ended = time.perf_counter()  # before the trackers finish (a W&B run takes a moment to close)

    if metrics is not None:
        metrics.close()
    last["run"] = _run_figures(device, tokens_here, ended - started, steps_here)
    finished = step == total_steps
    if finished and export is not None:
        export(last)
    return EngineResult(step, finished, last)


def _clip(params: list[torch.nn.Parameter], clip: float, fsdp: bool) -> float:
    """Clip the global gradient norm to `clip` (0: no clipping) and return the norm before clipping."""
    if fsdp:
        # DTensor gradients: the norm over every rank's shard (inf: measure without clipping).
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def _peak_memory_mib(dev: torch.device) -> float:
    """This process's peak memory so far (CUDA: allocated tensors; CPU: resident set), in MiB."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    from fusekit._procmem import memory_mb

    return memory_mb()["VmHWM"]


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
