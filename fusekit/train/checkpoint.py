"""Checkpoints: model, optimizer (sharded, each rank its part), scheduler, step and RNG; never gathered.

Layout of OUT/checkpoints/step-00000042/:
- the model: `model.safetensors` + config.json (`save_pretrained`, written by rank 0) when one process
  or DDP holds it whole; under FSDP2, `model/` — each rank's shards (`sharded_state`) — + config.json;
- `optimizer/`: each rank's part of the AdamW moments (`sharded_state`), on every layout;
- `trainer_state.{json,safetensors}`: scheduler, step, the optimizer's hyper-parameters, the run's
  options and identity (`safe_state`: JSON + safetensors);
- `rng-rank{R}.{json,safetensors}` per rank.
Nothing is a pickle, and a checkpoint that holds `*.pt`/`*.pkl`/`*.bin` files is refused rather than
unpickled. No rank ever gathers the model or the optimizer state, and either layout resumes on any
number of ranks, sharded or not (the sharded parts are resliced on load).

A checkpoint is written under `.tmp-step-N` and renamed when every rank's part is on disk, so a kill or
a full disk during a save leaves the previous checkpoint as the latest one (older ones are deleted only
after the rename); a write failing on any rank fails the save on every rank. The finished model goes to
OUT itself, with `fusekit_train.json`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import fusekit.train.sharded_state as sharded_state
from fusekit.models.load import quiet_transformers
from fusekit.train.ddp import Dist
from fusekit.train.safe_state import UnsafeStateError, load_state, save_state

DONE_FILE = "fusekit_train.json"
STATE_STEM = "trainer_state"
STATE_FILE = STATE_STEM + ".json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, with what to do."""


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    # Folders with pickled state are listed too, so that resuming refuses them instead of skipping them.
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() or any(p.glob("*.pt"))]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MODEL_SHARDS = "model"
OPTIMIZER_SHARDS = "optimizer"


def is_sharded(ckpt: Path) -> bool:
    """Whether the checkpoint's model is in per-rank shards (written under FSDP2) rather than whole."""
    return (ckpt / MODEL_SHARDS).is_dir()


def _together(d: Dist, what: str, write: Callable[[], None], main_only: bool = False) -> None:
    """Run `write` (on rank 0 alone with `main_only`) and fail on every rank if it failed on any, instead
    of leaving the others waiting at the next collective for a rank that has left."""
    error = None
    if d.is_main or not main_only:
        try:
            write()
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
    failed = d.any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"another rank could not write {what}; the previous checkpoint is kept")


def save_checkpoint(
    out: Path, step: int, net, step_model, optimizer, scheduler, meta: dict, d: Dist, keep: int, fsdp: bool = False
) -> Path:
    """Write OUT/checkpoints/step-N atomically; every rank calls it and writes its own part."""
    root = checkpoints_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    sharded = fsdp and d.grouped

    def prepare() -> None:
        for stale in root.glob(".tmp-step-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)

    _together(d, tmp.name, prepare, main_only=True)
    if sharded:
        sharded_state.save_model(tmp / MODEL_SHARDS, step_model, net)
    param_groups = sharded_state.save_optimizer(tmp / OPTIMIZER_SHARDS, step_model, optimizer)

    def write_whole() -> None:
        with quiet_transformers():
            if sharded:
                net.config.save_pretrained(tmp)
            else:
                net.save_pretrained(tmp, safe_serialization=True)
        state = {"param_groups": param_groups, "scheduler": scheduler.state_dict(), "step": step,
                 "world_size": d.world_size, "sharded_model": sharded, **meta}
        save_state(tmp / STATE_STEM, state)

    _together(d, f"{tmp}/{STATE_FILE}", write_whole, main_only=True)
    # Each rank's dropout stream is its own.
    _together(d, "the RNG states", lambda: save_state(tmp / f"rng-rank{d.rank}", rng_state()))

    def commit() -> None:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    _together(d, final.name, commit, main_only=True)
    return final


def load_model_shards(ckpt: Path, step_model, net) -> None:
    """Load a sharded checkpoint's model part into `net` (inside `step_model`), in place, sharded or not."""
    sharded_state.load_model(ckpt / MODEL_SHARDS, step_model, net)


def load_optimizer(ckpt: Path, step_model, optimizer, state: dict, fsdp: bool) -> None:
    """Restore the optimizer of checkpoint `ckpt` (trainer state `state`) into `optimizer`, on any number
    of ranks. Checkpoints of earlier fusekit versions kept the whole optimizer state in `state`."""
    if "optimizer" not in state:
        sharded_state.load_optimizer(ckpt / OPTIMIZER_SHARDS, step_model, optimizer, state["param_groups"])
    elif not fsdp:
        optimizer.load_state_dict(state["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(step_model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))


def _refuse_pickles(ckpt: Path) -> None:
    # fusekit writes safetensors and JSON only; .pt/.pkl/.bin files are pickles (or claim to be).
    pickles = sorted(p.name for pattern in ("*.pt", "*.pkl", "*.bin") for p in ckpt.glob(pattern))
    if pickles:
        raise CheckpointError(
            f"{ckpt} holds {', '.join(pickles)}: pickled state, which can run code when loaded, so fusekit "
            "does not read it; resume only from checkpoints this fusekit wrote (JSON + safetensors), or start afresh"
        )


def read_state(ckpt: Path) -> dict:
    """The trainer state (optimizer, scheduler, step, options) of a checkpoint; never unpickles."""
    _refuse_pickles(ckpt)
    try:
        state = load_state(ckpt / STATE_STEM)
    except UnsafeStateError as exc:
        raise CheckpointError(f"cannot resume from {ckpt}: {exc}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"cannot resume from {ckpt}: its trainer state has no step")
    return state


def load_trainer_state(ckpt: Path, d: Dist) -> tuple[dict, dict | None]:
    state = read_state(ckpt)
    rng_stem = ckpt / f"rng-rank{d.rank}"
    rng = None
    if rng_stem.with_suffix(".json").is_file():
        try:
            rng = load_state(rng_stem)
        except UnsafeStateError as exc:
            raise CheckpointError(f"cannot resume from {ckpt}: {exc}") from None
    return state, rng


def write_done(out: Path, summary: dict) -> None:
    (out / DONE_FILE).write_text(json.dumps(summary, indent=2))


def read_done(out: Path) -> dict | None:
    path = out / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
