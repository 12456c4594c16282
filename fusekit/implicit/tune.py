"""Stage 4 (sft, dpo): fine-tune the target — one loop, two objectives.

* SFT: token-mean cross-entropy on the response tokens of sft.parquet (the best response per prompt).
* DPO: the DPO loss (fusekit.implicit.dpo) on pairs.parquet, the SFT model as the frozen reference;
  the reference's log-probs are computed once, stored in dpo/reference.parquet, and read back.

The loop reuses fusekit.train's schedule (linear warm-up, cosine decay) and parameter groups. Batches
are a pure function of (seed, epoch): order = permutation(seed, epoch), then consecutive slices.
With `save_every`, a stage killed mid-training continues from its last checkpoint; without, it starts
over (models are written once, when a stage finishes).
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


def _load_weights(net, folder: Path) -> None:
    """Weights saved by `save_pretrained` (one safetensors file or an indexed set of shards) into `net`."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted({folder / f for f in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()})
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = net.load_state_dict(state, strict=False)
    # Tied weights (e.g. GPT-2's lm_head) are saved once; anything else missing is a real mismatch.
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ImplicitError(f"checkpoint {folder} does not match the model (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}): delete it")


def optimize(net, n_items: int, step_loss: Callable[[np.ndarray, int, int], tuple], opts: SFTOptions, out: Path) -> list[dict]:
    """The training loop: AdamW, warm-up + cosine schedule, clipping, optional checkpoints.

    `step_loss(indices, step, total_steps)` → (loss tensor, metrics dict) for the items of one step.
    With `opts.save_every`, a checkpoint (weights, optimizer, schedule, step, RNG; fusekit.train's
    checkpoint format) is written every that many steps under OUT/checkpoints; a call that finds one
    continues from the latest, exactly (batches are a pure function of seed and epoch). Checkpoints
    are removed when training ends. Returns the per-step metrics (also in OUT/metrics.jsonl).
    """
    import shutil

    import torch

    from fusekit.train import checkpoint as ckpt
    from fusekit.train.ddp import Dist
    from fusekit.train.loop import _param_groups, cosine_with_warmup

    per_epoch = math.ceil(n_items / opts.batch_size)
    total = max(1, math.ceil(opts.epochs * per_epoch))
    torch.manual_seed(opts.seed)
    optimizer = torch.optim.AdamW(_param_groups(net, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, opts.warmup_ratio))
    params = [p for p in net.parameters() if p.requires_grad]
    out.mkdir(parents=True, exist_ok=True)
    single = Dist()
    start, log = 0, []
    found = ckpt.list_checkpoints(out)
    if found:
        _load_weights(net, found[-1])
        try:
            state, rng = ckpt.load_trainer_state(found[-1], single)
        except ckpt.CheckpointError as exc:
            raise ImplicitError(str(exc)) from None
        ckpt.load_optimizer(net, optimizer, state["optimizer"], fsdp=False)
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        if rng is not None:
            ckpt.set_rng_state(rng)
        if (out / METRICS_FILE).is_file():
            log = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
            log = [row for row in log if row["step"] <= start]
    net.train()
    with (out / METRICS_FILE).open("w") as fh:
        for row in log:
            fh.write(json.dumps(row) + "\n")
        for step in range(start, total):
            epoch, within = divmod(step, per_epoch)
            order = np.random.default_rng([opts.seed, epoch]).permutation(n_items)
            idx = order[within * opts.batch_size : (within + 1) * opts.batch_size]
            loss, metrics = step_loss(idx, step, total)
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
            fh.flush()
            if opts.save_every and (step + 1) % opts.save_every == 0 and step + 1 < total:
                ckpt.save_checkpoint(out, step + 1, net, net, optimizer, scheduler, {}, single, keep=1)
    shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    net.eval()
    return log


def _save(net, tokenizer, folder: Path) -> Path:
    """Save model + tokenizer to a temporary folder, then rename it to `folder`."""
    import shutil

    from fusekit.model_io import quiet_transformers

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        net.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _load(model: str | Path):
    from fusekit.model_io import load_model, load_tokenizer

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

    def step_loss(idx, step, total):
        batch = collate([items[i] for i in idx], pad, dev)
        with autocast:
            logp, mask = token_logps(net, batch)
        return -logp.sum() / mask.sum().clamp(min=1), {"tokens": int(mask.sum())}

    t0 = time.perf_counter()
    log = optimize(net, len(items), step_loss, opts, out)
    _save(net, tok, out / "model")
    return {"examples": len(items), "skipped": skipped, "steps": len(log), "final_loss": log[-1]["loss"], "seconds": time.perf_counter() - t0}


def _pair_items(tok, prompts: dict[str, Prompt], pairs: pl.DataFrame, max_length: int, columns: Sequence[str]) -> tuple[list[int], list[list[Encoded]]]:
    """The rows whose every response column fits max_length, and their encodings per column."""
    keep: list[int] = []
    encoded: list[list[Encoded]] = [[] for _ in columns]
    for r, row in enumerate(pairs.iter_rows(named=True)):
        messages = prompts[row["prompt_id"]].messages
        items = [encode(tok, messages, row[c], max_length) for c in columns]
        if all(e is not None for e in items):
            keep.append(r)
            for lst, e in zip(encoded, items):
                lst.append(e)
    return keep, encoded


def _columns(opts: DPOOptions) -> list[str]:
    return ["chosen", "chosen_self", "rejected"] if opts.objective == "wrpo" else ["chosen", "rejected"]


def reference_logps(model: str | Path, prompts: dict[str, Prompt], pairs: pl.DataFrame, opts: DPOOptions, path: Path) -> pl.DataFrame:
    """log π_ref(y | x) of every response column (chosen, rejected; WRPO also chosen_self) for every
    usable pair, computed once → `path`.

    Columns: row (int: the pair's row in the pairs frame), ref_chosen, ref_rejected, … (Float64, nats).
    """
    import torch

    if path.is_file():
        return pl.read_parquet(path)
    net, tok = _load(model)
    dev = _device()
    net.to(dev).eval()
    columns = _columns(opts)
    keep, encoded = _pair_items(tok, prompts, pairs, opts.max_length, columns)
    pad = _pad_id(tok)
    values: dict[str, list[float]] = {f"ref_{c}": [] for c in columns}
    with torch.inference_mode():
        for c, items in zip(columns, encoded):
            for i in range(0, len(keep), opts.batch_size):
                values[f"ref_{c}"].extend(sequence_logps(net, collate(items[i : i + opts.batch_size], pad, dev)).tolist())
    frame = pl.DataFrame({"row": keep, **values}, schema={"row": pl.Int64, **{k: pl.Float64 for k in values}})
    write_parquet(frame, path)
    return frame


def run_dpo(sft_model: str | Path, prompts: dict[str, Prompt], pairs: pl.DataFrame, opts: DPOOptions, out: Path) -> dict:
    """DPO (or WRPO) from the SFT model against itself (frozen, stored log-probs); the model goes to OUT/model.

    `pairs`: chosen, rejected (DPO; PAIR_SCHEMA) or chosen, chosen_self, rejected (WRPO; WRPO_SCHEMA).
    With WRPO the fusion coefficient rises linearly from 0 at the first step to `opts.alpha` at the last.
    Returns {"pairs", "skipped", "steps", "final_loss", "reward_accuracy", "seconds"}.
    """
    import torch

    from fusekit.implicit.dpo import wrpo_loss

    if pairs.height == 0:
        raise ImplicitError("no preference pair to train on (every source scored its samples alike): raise sample.n or lower build.margin")
    t0 = time.perf_counter()
    columns = _columns(opts)
    ref = reference_logps(sft_model, prompts, pairs, opts, out / "reference.parquet")
    net, tok = _load(sft_model)
    dev = _device()
    net.to(dev)
    keep, encoded = _pair_items(tok, prompts, pairs, opts.max_length, columns)
    if keep != ref["row"].to_list() or any(f"ref_{c}" not in ref.columns for c in columns):
        raise ImplicitError(f"{out / 'reference.parquet'} does not match the pairs: delete it to recompute")
    if not keep:
        raise ImplicitError(f"no pair fits dpo.max_length={opts.max_length}: raise it")
    refs = [torch.tensor(ref[f"ref_{c}"].to_numpy(), dtype=torch.float32, device=dev) for c in columns]
    pad = _pad_id(tok)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def step_loss(idx, step, total):
        n = len(idx)
        # every response column of the step in one forward pass: [chosen…; (chosen_self…;) rejected…]
        batch = collate([items[i] for items in encoded for i in idx], pad, dev)
        with autocast:
            logps = sequence_logps(net, batch)
        parts = [logps[k * n : (k + 1) * n] for k in range(len(columns))]
        t = torch.as_tensor(idx, device=dev)
        ref_parts = [r[t] for r in refs]
        metrics = {}
        if opts.objective == "wrpo":
            alpha = opts.alpha * (step / (total - 1) if total > 1 else 1.0)
            out_ = wrpo_loss(*parts, *ref_parts, beta=opts.beta, alpha=alpha)
            metrics["alpha"] = alpha
        else:
            out_ = dpo_loss(parts[0], parts[1], ref_parts[0], ref_parts[1], opts.beta)
        acc = float((out_.chosen_reward > out_.rejected_reward).float().mean())
        return out_.loss, {**metrics, "reward_accuracy": acc, "margin": float((out_.chosen_reward - out_.rejected_reward).mean())}

    log = optimize(net, len(keep), step_loss, opts, out)
    _save(net, tok, out / "model")
    last = log[-max(1, len(log) // 4):]
    return {
        "pairs": len(keep), "skipped": pairs.height - len(keep), "steps": len(log), "final_loss": log[-1]["loss"],
        "reward_accuracy": float(np.mean([r["reward_accuracy"] for r in last])), "seconds": time.perf_counter() - t0,
    }
