"""Checkpoints: the model as safetensors (`save_pretrained`) plus optimizer, scheduler, step and RNG.

Layout: OUT/checkpoints/step-00000042/{config.json, model.safetensors, trainer_state.{json,safetensors},
rng-rank0.{json,safetensors}, …}. Trainer state and RNG are JSON + safetensors (`safe_state`), never
pickles: a checkpoint that holds `*.pt` files is refused rather than unpickled. Under FSDP2 the model and
the optimizer state are gathered to full (unsharded) state dicts, so a checkpoint is the same files
whatever the world size. A checkpoint is written under a temporary name and renamed when complete, so
an interrupted save never looks like a checkpoint. The finished model goes to OUT itself, with
`fusekit_train.json`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fusekit.train.ddp import Dist
from fusekit.models.load import quiet_transformers
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


def full_state_dicts(step_model: torch.nn.Module, optimizer, fsdp: bool) -> tuple[dict | None, dict]:
    """(model weights or None, optimizer state): gathered from every rank's shards under FSDP2
    (collective: every rank calls it); the model's own state dict is read by `save_pretrained` otherwise."""
    if not fsdp:
        return None, optimizer.state_dict() if optimizer is not None else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(step_model, options=opts)
    weights = {k.removeprefix("lm."): v for k, v in weights.items()}
    optim = get_optimizer_state_dict(step_model, optimizer, options=opts) if optimizer is not None else {}
    return weights, optim


def load_optimizer(step_model: torch.nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(step_model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    out: Path, step: int, net, step_model, optimizer, scheduler, meta: dict, d: Dist, keep: int, fsdp: bool = False
) -> Path:
    """Write OUT/checkpoints/step-N atomically; every rank calls it (each writes its RNG state)."""
    root = checkpoints_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    weights, optim = full_state_dicts(step_model, optimizer, fsdp and d.enabled)
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with quiet_transformers():
            net.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        save_state(tmp / STATE_STEM, {"optimizer": optim, "scheduler": scheduler.state_dict(), "step": step, **meta})
    d.barrier()
    save_state(tmp / f"rng-rank{d.rank}", rng_state())  # each rank's dropout stream is its own
    d.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


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
