"""Stage 4 (sft, dpo): fine-tune the target through fusekit.train's engine — the loop fusion training uses.

* SFT: token-mean cross-entropy on the response tokens of sft.parquet (the best response per prompt).
* DPO: the DPO loss (fusekit.implicit.dpo) on pairs.parquet, the SFT model as the frozen reference;
  the reference's log-probs are computed once, stored in dpo/reference.parquet, and read back.

The objectives (what a batch is, how its loss is computed) are in `objectives.py`; optimizer, schedule
(linear warm-up, cosine decay), clipping, checkpoints, metrics.jsonl and the progress bar are
`fusekit.train.engine.run`, with fusion training's step module for sequence log-probs
(`fusekit.train.head.LogpStep`: the output layer in chunks, never [B, L, V] logits, where the model's
head allows it). With `save_every`, a stage killed mid-training continues from its last checkpoint;
without, it starts over (models are written once, when a stage finishes).

Under `torchrun` the stages train on every rank with DDP (FSDP2 with `fsdp: true`), each rank on its
share of every step's batch, and rank 0 writes the model; the reference log-probs are split over the
ranks too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from fusekit.models.device import resolve_device
from fusekit.implicit.config import DPOOptions, SFTOptions
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.objectives import PreferenceObjective, SFTObjective
from fusekit.implicit.prompts import Prompt
from fusekit.implicit.sequences import Encoded, collate, encode, pad_id
from fusekit.implicit.stage import write_parquet


def _distributed():
    from fusekit.train.ddp import init_distributed

    return init_distributed()


def _device(d):
    return d.device(None) if d.enabled else resolve_device(None)


def _step_module(net, opts: SFTOptions, dev, d):
    """The engine's step module: sequence log-probs through the chunked head where the model allows it."""
    import warnings

    from fusekit.train.head import LogpStep, head_problem

    problem = None if opts.fused_head == "off" else head_problem(net, dev)
    if problem is not None and opts.fused_head == "on":
        raise ImplicitError(f"fused_head on: {type(net).__name__}: {problem}; use fused_head auto or off")
    if problem is not None and d.is_main:
        warnings.warn(f"{type(net).__name__}: {problem}: sequence log-probs through full [B, L, V] logits", stacklevel=3)
    return LogpStep(net, fused=opts.fused_head != "off" and problem is None)


def fit(model: str | Path, objective, opts: SFTOptions, out: Path, progress: bool = False, save_to: Path | None = None, tokenizer=None):
    """Train `model` (a path or hub id) on `objective` with the engine; returns (the trained net, metrics rows).

    With `opts.save_every`, a checkpoint (fusekit.train's format: weights, optimizer, schedule, step,
    RNG) is written every that many steps under OUT/checkpoints; a call that finds one continues from
    the latest, exactly. Checkpoints are removed when training ends; the metrics stay in OUT/metrics.jsonl.
    `save_to`: the folder the trained model (and `tokenizer`) is written to, by rank 0, from the full
    weights (gathered from the shards under FSDP2). Under torchrun the objective must split each step
    over the ranks (`world_size`). Raises ImplicitError for a checkpoint that cannot be resumed from.
    """
    import torch

    from fusekit.models.load import load_model
    import fusekit.train.checkpoint as ckpt
    import fusekit.train.engine as engine
    from fusekit.train.ddp import shard

    d = _distributed()
    found = ckpt.list_checkpoints(out)
    start = found[-1] if found else None
    # A checkpoint written under FSDP2 holds each rank's part of the weights, read after sharding below.
    sharded_start = start is not None and ckpt.is_sharded(start)
    net = load_model(model if sharded_start else (start or model))
    net.config.use_cache = False
    torch.manual_seed(opts.seed)
    dev = _device(d)
    net.to(dev).train()
    settings = engine.EngineSettings(
        lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.95), warmup_ratio=opts.warmup_ratio, clip=opts.clip,
        bf16=dev.type == "cuda", fsdp=opts.fsdp, save_every=opts.save_every, keep_checkpoints=1, checkpoint_at_end=False,
        report_to=tuple(opts.report_to), meta={"config": opts.identity()},
    )

    step_module = _step_module(net, opts, dev, d)
    if sharded_start:
        if opts.fsdp and d.grouped:
            step_module = shard(step_module, dev, bf16=settings.bf16)  # the engine keeps a sharded module as it is
        ckpt.load_model_shards(start, step_module, net)

    def export(_last: dict) -> None:
        _save(net, step_module, tokenizer, save_to, opts.fsdp and d.grouped, d)

    try:
        engine.run(net, objective, out, settings, d, dev, step_module=step_module, start=start,
                   progress=progress and d.is_main, export=export if save_to is not None else None)
    except ckpt.CheckpointError as exc:
        raise ImplicitError(f"{exc} (or delete {ckpt.checkpoints_dir(out)})") from None
    if d.is_main:
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    d.barrier()
    net.eval()
    return net, engine.read_metrics(out)


def _save(net, step_module, tokenizer, folder: Path, sharded: bool, d) -> Path:
    """Save model + tokenizer to a temporary folder, then rename it to `folder` (`write_hf_model`: under
    FSDP2 every rank writes its shards, no rank gathers the model). Collective."""
    from fusekit.train.export import write_hf_model

    tmp = folder.with_name(f".tmp-{folder.name}")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    write_hf_model(tmp, net, step_module, tokenizer, sharded, d)
    if d.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    d.barrier()
    return folder


def _load(model: str | Path):
    from fusekit.models.load import load_model, load_tokenizer

    net = load_model(model)
    net.config.use_cache = False
    return net, load_tokenizer(model)


def run_sft(model: str | Path, prompts: dict[str, Prompt], sft: pl.DataFrame, opts: SFTOptions, out: Path, progress: bool = False) -> dict:
    """Train `model` on the responses of `sft` (response tokens only); the model goes to OUT/model.

    Returns {"examples", "skipped", "steps", "final_loss", "seconds"}. Raises ImplicitError when no
    example fits max_length.
    """
    from fusekit.models.load import load_tokenizer

    tok = load_tokenizer(model)
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
    t0 = time.perf_counter()
    objective = SFTObjective(items, pad_id(tok), opts.batch_size, opts.epochs, opts.seed, world_size=_distributed().world_size)
    net, log = fit(model, objective, opts, out, progress, save_to=out / "model", tokenizer=tok)
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
    d = _distributed()
    net, tok = _load(model)
    dev = _device(d)
    net.to(dev).eval()
    step = _step_module(net, opts, dev, d)
    columns = _columns(opts)
    keep, encoded = _pair_items(tok, prompts, pairs, opts.max_length, columns)
    pad = pad_id(tok)
    values: dict[str, list[float]] = {}
    with torch.inference_mode():
        for c, items in zip(columns, encoded):
            mine = np.zeros(len(keep), dtype=np.float64)  # this rank's batches; the other ranks' stay 0 here
            for b, i in enumerate(range(0, len(keep), opts.batch_size)):
                if b % d.world_size == d.rank:
                    batch = collate(items[i : i + opts.batch_size], pad, dev)
                    mine[i : i + len(batch.input_ids)] = step(batch.input_ids, batch.attention_mask, batch.labels).double().cpu().numpy()
            values[f"ref_{c}"] = d.sum(mine.tolist(), dev) if d.enabled else mine.tolist()
    frame = pl.DataFrame({"row": keep, **values}, schema={"row": pl.Int64, **{k: pl.Float64 for k in values}})
    if d.is_main:
        write_parquet(frame, path)
    d.barrier()
    return frame


def run_dpo(sft_model: str | Path, prompts: dict[str, Prompt], pairs: pl.DataFrame, opts: DPOOptions, out: Path, progress: bool = False) -> dict:
    """DPO (or WRPO) from the SFT model against itself (frozen, stored log-probs); the model goes to OUT/model.

    `pairs`: chosen, rejected (DPO; PAIR_SCHEMA) or chosen, chosen_self, rejected (WRPO; WRPO_SCHEMA).
    With WRPO the fusion coefficient rises linearly from 0 at the first step to `opts.alpha` at the last.
    Returns {"pairs", "skipped", "steps", "final_loss", "reward_accuracy", "seconds"}.
    """
    from fusekit.models.load import load_tokenizer

    if pairs.height == 0:
        raise ImplicitError("no preference pair to train on (every source scored its samples alike): raise sample.n or lower build.margin")
    t0 = time.perf_counter()
    columns = _columns(opts)
    ref = reference_logps(sft_model, prompts, pairs, opts, out / "reference.parquet")
    tok = load_tokenizer(sft_model)
    keep, encoded = _pair_items(tok, prompts, pairs, opts.max_length, columns)
    if keep != ref["row"].to_list() or any(f"ref_{c}" not in ref.columns for c in columns):
        raise ImplicitError(f"{out / 'reference.parquet'} does not match the pairs: delete it to recompute")
    if not keep:
        raise ImplicitError(f"no pair fits dpo.max_length={opts.max_length}: raise it")
    objective = PreferenceObjective(
        encoded, [ref[f"ref_{c}"].to_numpy() for c in columns], pad_id(tok), objective=opts.objective,
        beta=opts.beta, alpha=opts.alpha, batch_size=opts.batch_size, epochs=opts.epochs, seed=opts.seed,
        world_size=_distributed().world_size,
    )
    net, log = fit(sft_model, objective, opts, out, progress, save_to=out / "model", tokenizer=tok)
    last = log[-max(1, len(log) // 4):]
    return {
        "pairs": len(keep), "skipped": pairs.height - len(keep), "steps": len(log), "final_loss": log[-1]["loss"],
        "reward_accuracy": float(np.mean([r["reward_accuracy"] for r in last])), "seconds": time.perf_counter() - t0,
    }
