"""Stage 4 (sft, dpo): fine-tune the target through fusekit.train's engine — the loop fusion training uses.

* SFT: token-mean cross-entropy on the response tokens of sft.parquet (the best response per prompt).
* DPO: the DPO loss (fusekit.implicit.dpo) on pairs.parquet, the SFT model as the frozen reference;
  the reference's log-probs are computed once, stored in dpo/reference.parquet, and read back.

The objectives (what a batch is, how its loss is computed) are in `objectives.py`; optimizer, schedule
(linear warm-up, cosine decay), clipping, checkpoints, metrics.jsonl and the progress bar are
`fusekit.train.engine.run`. With `save_every`, a stage killed mid-training continues from its last
checkpoint; without, it starts over (models are written once, when a stage finishes).
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
from fusekit.implicit.sequences import Encoded, collate, encode, pad_id, sequence_logps
from fusekit.implicit.stage import write_parquet


def fit(model: str | Path, objective, opts: SFTOptions, out: Path, progress: bool = False):
    """Train `model` (a path or hub id) on `objective` with the engine; returns (the trained net, metrics rows).

    With `opts.save_every`, a checkpoint (fusekit.train's format: weights, optimizer, schedule, step,
    RNG) is written every that many steps under OUT/checkpoints; a call that finds one continues from
    the latest, exactly. Checkpoints are removed when training ends; the metrics stay in OUT/metrics.jsonl.
    Raises ImplicitError for a checkpoint that cannot be resumed from.
    """
    import torch

    from fusekit.models.load import load_model
    import fusekit.train.checkpoint as ckpt
    import fusekit.train.engine as engine
    from fusekit.train.ddp import Dist

    found = ckpt.list_checkpoints(out)
    start = found[-1] if found else None
    net = load_model(start or model)
    net.config.use_cache = False
    torch.manual_seed(opts.seed)
    dev = resolve_device(None)
    net.to(dev).train()
    settings = engine.EngineSettings(
        lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.95), warmup_ratio=opts.warmup_ratio, clip=opts.clip,
        bf16=dev.type == "cuda", save_every=opts.save_every, keep_checkpoints=1, checkpoint_at_end=False,
        report_to=tuple(opts.report_to), meta={"config": opts.identity()},
    )
    try:
        engine.run(net, objective, out, settings, Dist(), dev, start=start, progress=progress)
    except ckpt.CheckpointError as exc:
        raise ImplicitError(f"{exc} (or delete {ckpt.checkpoints_dir(out)})") from None
    shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    net.eval()
    return net, engine.read_metrics(out)


def _save(net, tokenizer, folder: Path) -> Path:
    """Save model + tokenizer to a temporary folder, then rename it to `folder`."""
    from fusekit.models.load import quiet_transformers

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        net.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
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
    objective = SFTObjective(items, pad_id(tok), opts.batch_size, opts.epochs, opts.seed)
    net, log = fit(model, objective, opts, out, progress)
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
    dev = resolve_device(None)
    net.to(dev).eval()
    columns = _columns(opts)
    keep, encoded = _pair_items(tok, prompts, pairs, opts.max_length, columns)
    pad = pad_id(tok)
    values: dict[str, list[float]] = {f"ref_{c}": [] for c in columns}
    with torch.inference_mode():
        for c, items in zip(columns, encoded):
            for i in range(0, len(keep), opts.batch_size):
                values[f"ref_{c}"].extend(sequence_logps(net, collate(items[i : i + opts.batch_size], pad, dev)).tolist())
    frame = pl.DataFrame({"row": keep, **values}, schema={"row": pl.Int64, **{k: pl.Float64 for k in values}})
    write_parquet(frame, path)
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
    )
    net, log = fit(sft_model, objective, opts, out, progress)
    _save(net, tok, out / "model")
    last = log[-max(1, len(log) // 4):]
    return {
        "pairs": len(keep), "skipped": pairs.height - len(keep), "steps": len(log), "final_loss": log[-1]["loss"],
        "reward_accuracy": float(np.mean([r["reward_accuracy"] for r in last])), "seconds": time.perf_counter() - t0,
    }
