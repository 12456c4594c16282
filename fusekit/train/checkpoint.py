"""Checkpoints: the model as safetensors (`save_pretrained`) plus optimizer, scheduler, step and RNG.

Layout: OUT/checkpoints/step-00000042/{config.json, model.safetensors, trainer_state.pt, rng-rank0.pt, …}.
A checkpoint is written under a temporary name and renamed when complete, so an interrupted save never
looks like a checkpoint. The finished model goes to OUT itself, with `fusekit_train.json`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fusekit.train.ddp import Dist, unwrap
from fusekit.train.model_io import quiet_transformers

DONE_FILE = "fusekit_train.json"
STATE_FILE = "trainer_state.pt"


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
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


def full_state_dict(model: torch.nn.Module, fsdp: bool) -> dict | None:
    """The whole model's weights (gathered on rank 0 under FSDP; None on other ranks)."""
    if not fsdp:
        return None  # save_pretrained reads the module itself
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        return model.state_dict()


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, meta: dict, d: Dist, keep: int
) -> Path:
    root = checkpoints_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with quiet_transformers():
            unwrap(model).save_pretrained(tmp, safe_serialization=True)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, **meta}
        torch.save(state, tmp / STATE_FILE)
    d.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{d.rank}.pt")  # each rank's dropout stream is its own
    d.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load_trainer_state(ckpt: Path, d: Dist) -> tuple[dict, dict | None]:
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = ckpt / f"rng-rank{d.rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return state, rng


def write_done(out: Path, summary: dict) -> None:
    (out / DONE_FILE).write_text(json.dumps(summary, indent=2))


def read_done(out: Path) -> dict | None:
    path = out / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
