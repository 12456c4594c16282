"""Stage 4 (sft, dpo): fine-tune the target — one loop, two objectives.

* SFT: token-mean cross-entropy on the response tokens of sft.parquet (the best response per prompt).
* DPO: the DPO loss (fusekit.implicit.dpo) on pairs.parquet, the SFT model as the frozen reference;
  the reference's log-probs are computed once, stored in dpo/reference.parquet, and read back.

The loop reuses fusekit.train's schedule (linear warm-up, cosine decay) and parameter groups. Batches
are a pure function of (seed, epoch): order = permutation(seed, epoch), then consecutive slices.
A stage interrupted mid-training restarts that stage (models are written once, when it finishes).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from fusekit.implicit.config import DPOOptions, SFTOptions
from fusekit.implicit.dpo import dpo_loss
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.prompts import Prompt
from fusekit.implicit.sequences import Encoded, collate, encode, sequence_logps, token_logps
from fusekit.implicit.stage import write_parquet

METRICS_FILE = "metrics.jsonl"


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pad_id(tok) -> int:
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def optimize(net, n_items: int, step_loss: Callable[[np.ndarray], tuple], opts: SFTOptions, out: Path, progress_label: str = "") -> list[dict]:
    """The training loop: AdamW, warm-up + cosine schedule, clipping; `step_loss(indices)` → (loss, metrics).

    Returns the per-step metrics (also appended to OUT/metrics.jsonl).
    """
    import torch

    from fusekit.train.loop import _param_groups, cosine_with_warmup

    per_epoch = math.ceil(n_items / opts.batch_size)
    total = max(1, math.ceil(opts.epochs * per_epoch))
    torch.manual_seed(opts.seed)
    optimizer = torch.optim.AdamW(_param_groups(net, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, opts.warmup_ratio))
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    log: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    with (out / METRICS_FILE).open("w") as fh:
        for step in range(total):
            epoch, within = divmod(step, per_epoch)
            order = np.random.default_rng([opts.seed, epoch]).permutation(n_items)
            idx = order[within * opts.batch_size : (within + 1) * opts.batch_size]
            loss, metrics = step_loss(idx)
            loss.backward()
            if opts.clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, opts.clip))
            else:
                norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "loss": float(loss.detach()), "lr": lr, "grad_norm": norm, **metrics}
            log.append(row)
            fh.write(json.dumps(row) + "\n")
    net.eval()
    return log


def _save(net, tokenizer, folder: Path) -> Path:
    """Save model + tokenizer to a temporary folder, then rename it to `folder`."""
    import shutil

    from fusekit.train.model_io import quiet_transformers

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        net.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _load(model: str | Path):
    from fusekit.train.model_io import load_model, load_tokenizer

    net = load_model(model)
    net.config.use_cache = False
    return net, load_tokenizer(model)


def run_sft(model: str | Path, prompts: dict[str, Prompt], sft: pl.DataFrame, opts: SFTOptions, out: Path) -> dict:
    """Train `model` on the responses of `sft` (response tokens only); the model goes to OUT/model.

    Returns {"examples", "skipped", "steps", "final_loss", "seconds"}. Raises ImplicitError when no
    example fits max_length.
    """
    import torch

    net, tok = _load(model)
    dev = _device()
    net.to(dev)
    items: list[Encoded] = []
    skipped = 0
    for row in sft.iter_rows(named=True):
        e = encode(tok, prompts[row["prompt_id"]].messages, row["response"], opts.max_length)
        if e is None:
            skipped += 1
        else:
            items.append(e)
    if not items:
        raise ImplicitError(f"no SFT example fits sft.max_length={opts.max_length}: raise it")
    pad = _pad_id(tok)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def step_loss(idx):
        batch = collate([items[i] for i in idx], pad, dev)
        with autocast:
            logp, mask = token_logps(net, batch)
        return -logp.sum() / mask.sum().clamp(min=1), {"tokens": int(mask.sum())}

    t0 = time.perf_counter()
    log = optimize(net, len(items), step_loss, opts, out)
    _save(net, tok, out / "model")
    return {"examples": len(items), "skipped": skipped, "steps": len(log), "final_loss": log[-1]["loss"], "seconds": time.perf_counter() - t0}


def _pair_items(tok, prompts: dict[str, Prompt], pairs: pl.DataFrame, max_length: int) -> tuple[list[int], list[Encoded], list[Encoded]]:
    keep, chosen, rejected = [], [], []
    for r, row in enumerate(pairs.iter_rows(named=True)):
        messages = prompts[row["prompt_id"]].messages
        c = encode(tok, messages, row["chosen"], max_length)
        w = encode(tok, messages, row["rejected"], max_length)
        if c is not None and w is not None:
            keep.append(r)
            chosen.append(c)
            rejected.append(w)
    return keep, chosen, rejected


def reference_logps(model: str | Path, prompts: dict[str, Prompt], pairs: pl.DataFrame, opts: DPOOptions, path: Path) -> pl.DataFrame:
    """log π_ref(chosen | x) and log π_ref(rejected | x) for every usable pair, computed once → `path`.

    Columns: row (int: the pair's row in pairs.parquet), ref_chosen, ref_rejected (Float64, nats).
    """
    import torch

    if path.is_file():
        return pl.read_parquet(path)
    net, tok = _load(model)
    dev = _device()
    net.to(dev).eval()
    keep, chosen, rejected = _pair_items(tok, prompts, pairs, opts.max_length)
    pad = _pad_id(tok)
    rc, rr = [], []
    with torch.inference_mode():
        for i in range(0, len(keep), opts.batch_size):
            rc.extend(sequence_logps(net, collate(chosen[i : i + opts.batch_size], pad, dev)).tolist())
            rr.extend(sequence_logps(net, collate(rejected[i : i + opts.batch_size], pad, dev)).tolist())
    frame = pl.DataFrame({"row": keep, "ref_chosen": rc, "ref_rejected": rr}, schema={"row": pl.Int64, "ref_chosen": pl.Float64, "ref_rejected": pl.Float64})
    write_parquet(frame, path)
    return frame


def run_dpo(sft_model: str | Path, prompts: dict[str, Prompt], pairs: pl.DataFrame, opts: DPOOptions, out: Path) -> dict:
    """DPO from the SFT model against itself (frozen, stored log-probs); the model goes to OUT/model.

    Returns {"pairs", "skipped", "steps", "final_loss", "reward_accuracy", "seconds"}.
    """
    import torch

    if pairs.height == 0:
        raise ImplicitError("pairs.parquet holds no pair (every source scored its samples alike): raise sample.n or lower build.margin")
    t0 = time.perf_counter()
    ref = reference_logps(sft_model, prompts, pairs, opts, out / "reference.parquet")
    net, tok = _load(sft_model)
    dev = _device()
    net.to(dev)
    keep, chosen, rejected = _pair_items(tok, prompts, pairs, opts.max_length)
    if keep != ref["row"].to_list():
        raise ImplicitError(f"{out / 'reference.parquet'} does not match pairs.parquet: delete it to recompute")
    if not keep:
        raise ImplicitError(f"no pair fits dpo.max_length={opts.max_length}: raise it")
    ref_c = torch.tensor(ref["ref_chosen"].to_numpy(), dtype=torch.float32, device=dev)
    ref_r = torch.tensor(ref["ref_rejected"].to_numpy(), dtype=torch.float32, device=dev)
    pad = _pad_id(tok)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def step_loss(idx):
        n = len(idx)
        # chosen and rejected in one forward pass: [chosen…; rejected…]
        batch = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad, dev)
        with autocast:
            logps = sequence_logps(net, batch)
        t = torch.as_tensor(idx, device=dev)
        out_ = dpo_loss(logps[:n], logps[n:], ref_c[t], ref_r[t], opts.beta)
        acc = float((out_.chosen_reward > out_.rejected_reward).float().mean())
        return out_.loss, {"reward_accuracy": acc, "margin": float((out_.chosen_reward - out_.rejected_reward).mean())}

    log = optimize(net, len(keep), step_loss, opts, out)
    _save(net, tok, out / "model")
    last = log[-max(1, len(log) // 4):]
    return {
        "pairs": len(keep), "skipped": pairs.height - len(keep), "steps": len(log), "final_loss": log[-1]["loss"],
        "reward_accuracy": float(np.mean([r["reward_accuracy"] for r in last])), "seconds": time.perf_counter() - t0,
    }
