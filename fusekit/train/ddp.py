"""The distributed branch of the loop: process group set-up under torchrun, and the few collectives used.

Single process: every function is a no-op. Under `torchrun --nproc-per-node N`, ranks join a group
(NCCL on CUDA, gloo on CPU) and the loop wraps the model in DDP — or FSDP2 with `fsdp=True`, for models
that do not fit one GPU.
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fusekit.train.config import TrainConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group exists (under torchrun, even of one process): FSDP2 can shard then."""
        return dist.is_available() and dist.is_initialized()

    def device(self, requested: str | None) -> torch.device:
        if requested:
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (collective under torchrun)."""
        if not self.enabled:
            return flag
        on_gpu = dist.get_backend() == "nccl"
        t = torch.tensor([float(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(t)
        return bool(t.item() > 0)


def init_distributed() -> Dist:
    """Join the process group torchrun describes in the environment (or one the caller made)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" not in os.environ:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    # Kept until the process exits: a second `train` call in the same torchrun worker (stop, then resume)
    # reuses it, where re-creating a group over torchrun's store can hang both ranks.
    atexit.register(_destroy_group)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or joined a process group its caller made)."""
    return "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LM's repeated blocks (its `_no_split_modules` classes), in module order; `model` may wrap the LM
    as `.lm`. Raises TrainConfigError naming the class when it declares none."""
    lm = getattr(model, "lm", model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TrainConfigError(
            f"FSDP: cannot find the transformer blocks of {type(lm).__name__} (no _no_split_modules); "
            "train with DDP (no --fsdp)"
        )
    return blocks


def shard(model: torch.nn.Module, device: torch.device, *, bf16: bool = False, offload: bool = False) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on each transformer block, then on `model` (the root).

    One unit per block, so only one block's full weights exist at a time; untied input and output embeddings
    are units of their own too, tied ones stay together in the root unit with the final norm. Works on meta-device parameters too
    (`meta_init`), before they are materialised. `bf16`: blocks are gathered and computed in bf16 and
    gradients reduced in fp32 (`MixedPrecisionPolicy`), the sharded master weights staying fp32.
    `offload`: sharded parameters, gradients and optimizer state live in host memory (`CPUOffloadPolicy`;
    pinned on CUDA), moved to the device block by block.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy(),
    }
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    lm = getattr(model, "lm", model)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if embedding is not None and isinstance(head, torch.nn.Linear) and head.weight is not embedding.weight:
        # Untied, each is a unit of its own, gathered only while it runs: the embedding for its lookup (and
        # its gradient), the output layer while the fused loss runs inside its call (`head.loss_at_head`).
        fully_shard(embedding, **options)
        if type(embedding).forward is torch.nn.Embedding.forward:
            embedding.set_unshard_in_backward(False)  # a lookup's weight gradient needs the indices only
        fully_shard(head, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, fsdp: bool, bf16: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 (`shard`) with `fsdp` — under torchrun, on one process too (a mesh of one: the
    mixed-precision and offload policies, sharded checkpoints); a model already sharded (`meta_init`) is
    returned as it is.

    FSDP2 keeps parameters as DTensors sharded over ranks; it runs on CUDA (NCCL) and on CPU (gloo).
    Build the optimizer after this call, over the returned module's parameters.
    """
    if fsdp and d.grouped:
        return model if is_sharded(model) else shard(model, device, bf16=bf16)
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch: without `sync`, gradients accumulate locally (DDP's no_sync;
    FSDP2's set_requires_gradient_sync)."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _Fsdp2NoSync(model)
    return nullcontext()


class _Fsdp2NoSync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
