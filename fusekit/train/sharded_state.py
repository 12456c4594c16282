"""Model and optimizer state on disk without gathering it: each rank writes and reads its own part.

The files are torch's distributed checkpoint (DCP) in its Hugging Face storage: plain safetensors, one
per rank and group of tensors (`shard-0000R-model-0000I-of-0000N.safetensors`), each tensor stored as
this rank's slice with its offsets in the file's JSON metadata. No `.metadata` pickle is written or read
(the reader rebuilds the layout from the safetensors headers), so loading runs no code. Reading plans
the slices each rank needs from whatever slices were written, so a state saved on W ranks loads on any
number of ranks, sharded (FSDP2) or whole (one process, DDP).

Memory: the writer builds each file in memory before writing it, so tensors are grouped into files of
~1/32 of what each rank writes (8–256 MiB per rank); a save then costs a few percent of the state.

Keys: the model under its Hugging Face names (the LM's own, without the training wrapper's prefix and
without the second name of a tied weight — as `save_pretrained` writes them), the optimizer under
`state.<parameter name>.<exp_avg|exp_avg_sq|step>`; the optimizer's hyper-parameters (param_groups) are
plain values that the caller stores as JSON.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

FILE_SHARE = 32  # a file holds ~1/32 of what a rank writes in one save…
FILE_BYTES = (8 << 20, 256 << 20)  # …within these bounds (bytes per rank and file)
EXPORT_SHARD_BYTES = 5 * 10**9  # per file of the exported model (above it: several files and an index)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is its global size


def file_index(tensors: dict[str, torch.Tensor], budget: int | None = None, world: int = 1) -> dict[str, int]:
    """Key → file number (from 1): keys in order, a new file whenever a file's share per rank (its
    bytes / `world`) would pass `budget` — by default 1/`FILE_SHARE` of a rank's share of `tensors`,
    within `FILE_BYTES`, so that writing a file costs a few percent of the state being written. The same
    on every rank (global sizes, dict order)."""
    if budget is None:
        per_rank = sum(_nbytes(t) for t in tensors.values()) / world
        budget = min(max(per_rank / FILE_SHARE, FILE_BYTES[0]), FILE_BYTES[1])
    index, used, number = {}, 0, 1
    for key, t in tensors.items():
        share = _nbytes(t) / world
        if used and used + share > budget:
            number, used = number + 1, 0
        index[key] = number
        used += share
    return index


def _prefix_of(net: nn.Module, step_model: nn.Module) -> str:
    """The qualified-name prefix of `net` inside `step_model` ("lm." for FusionStep; "" for net itself)."""
    for name, module in step_model.named_modules():
        if module is net:
            return f"{name}." if name else ""
    raise ValueError("the trained model is not part of the step module")


def model_tensors(step_model: nn.Module, net: nn.Module) -> dict[str, torch.Tensor]:
    """`net`'s parameters and persistent buffers under their Hugging Face names: this rank's shards
    (DTensors) under FSDP2, whole tensors otherwise. The values share storage with the model, so loading
    into them loads the model. A tied weight appears once, under its first name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    prefix = _prefix_of(net, step_model)
    state = get_model_state_dict(step_model)
    seen, aliases = {}, set()
    for name, param in net.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        else:
            seen[id(param)] = name
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name not in aliases:
                out[name] = value
    return out


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], index: dict[str, int]) -> None:
    """Each rank writes its part of `tensors` under FOLDER, grouped into files by `index`. Collective;
    a write failing on any rank raises on every rank (DCP gathers the results)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    folder.mkdir(parents=True, exist_ok=True)
    with _one_process_is_intended():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=index, save_distributed=True))


def load_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` in place (shards or whole tensors) from what `save_tensors` wrote, whatever the
    number of ranks that wrote it. Collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    with _one_process_is_intended():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))


@contextmanager
def _one_process_is_intended():
    """DCP warns on every call outside a process group that it assumes one process: here that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_model(folder: Path, step_model: nn.Module, net: nn.Module) -> None:
    tensors = model_tensors(step_model, net)
    save_tensors(folder, tensors, file_index(tensors, world=_world()))


def load_model(folder: Path, step_model: nn.Module, net: nn.Module) -> None:
    """Load a model part written by `save_model` into `net` (inside `step_model`), in place."""
    load_tensors(folder, model_tensors(step_model, net))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _optimizer_tensors(step_model: nn.Module, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the optimizer state dict by parameter name — its tensors this rank's shards —, those tensors
    flattened under `state.<name>.<field>`). Initialises the state of a fresh optimizer (a zero step)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(step_model, optimizer)
    flat = {}
    for name, fields in state["state"].items():
        for field, value in fields.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {name}.{field} is a {type(value).__name__}, not a tensor")
            flat[f"state.{name}.{field}"] = value
    return state, flat


def save_optimizer(folder: Path, step_model: nn.Module, optimizer) -> list[dict]:
    """Write this rank's part of the optimizer state under FOLDER; returns the param_groups (plain
    values, the same on every rank) for the caller's JSON. Collective."""
    state, flat = _optimizer_tensors(step_model, optimizer)
    save_tensors(folder, flat, file_index(flat, world=_world()))
    return state["param_groups"]


def load_optimizer(folder: Path, step_model: nn.Module, optimizer, param_groups: list[dict]) -> None:
    """Restore what `save_optimizer` wrote (on any number of ranks) into `optimizer`. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state, flat = _optimizer_tensors(step_model, optimizer)
    load_tensors(folder, flat)
    for name, fields in state["state"].items():
        for field in fields:
            fields[field] = flat[f"state.{name}.{field}"]
    set_optimizer_state_dict(step_model, optimizer, {"state": state["state"], "param_groups": param_groups})


def export_model(out: Path, step_model: nn.Module, net: nn.Module, shard_bytes: int | None = None) -> list[str]:
    """Write `net`'s weights into OUT as a Hugging Face checkpoint — `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` files of ≤ `shard_bytes` (default `EXPORT_SHARD_BYTES`) with
    `model.safetensors.index.json` —
    without any rank or device holding the whole model. Collective; returns the files written.

    Each rank writes its shards (`save_tensors`), then the ranks assemble the output files between them,
    one tensor at a time in host memory (DCP's `consolidate_safetensors_files_on_every_rank`). The
    config, tokenizer and everything else are the caller's.
    """
    # Not re-exported by torch.distributed.checkpoint (a private module beside its HF storage): a version-floor item.
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank

    staging = out / ".export-shards"
    tensors = model_tensors(step_model, net)
    world = _world()
    main = world == 1 or dist.get_rank() == 0
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
    _barrier()
    save_tensors(staging, tensors, file_index(tensors, world=world))
    outputs = file_index(tensors, shard_bytes or EXPORT_SHARD_BYTES)
    consolidate_safetensors_files_on_every_rank(str(staging), str(out), outputs)  # ends with a barrier
    count = max(outputs.values())
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        if count == 1:  # one file: the plain single-file layout, no index
            (out / _output_name(1, 1)).rename(out / SINGLE_FILE)
            (out / INDEX_FILE).unlink()
    _barrier()
    return [SINGLE_FILE] if count == 1 else [_output_name(i, count) for i in range(1, count + 1)]


def _output_name(i: int, count: int) -> str:
    return f"model-{i:05d}-of-{count:05d}.safetensors"  # the consolidation's (and transformers') naming


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
