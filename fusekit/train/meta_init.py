"""FSDP2 for models that do not fit one device: build on the meta device, load on rank 0, broadcast shards.

Every rank builds the model from its config with parameters on the meta device (no memory), shards it
(`ddp.shard`), then allocates only its own shards on its device. Rank 0 alone reads the checkpoint —
an HF folder (sharded index included), a `.gguf` file or a hub id, through `models.load.load_weights`,
so the tensors are exactly those of a plain `load_model` — and sends it tensor by tensor
(`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`): each other rank receives one
full tensor at a time, keeps its slice and drops the rest. So no rank but rank 0 ever holds a full copy
of the weights, in host or device memory.

Two things a meta build does not give for free:
- tied weights: `from_config` ties them (one Parameter under two names) before anything moves, and
  moving a parameter that is already on meta keeps it the same object, so they stay tied;
- non-persistent buffers (rotary `inv_freq`, causal masks), which no checkpoint holds: only parameters
  go to meta here (buffers are computed by the modules' own `__init__`, as in a plain build) and they
  are put back after `to_empty`, which would otherwise leave them uninitialised.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fusekit.models.load import load_weights
from fusekit.train.ddp import Dist


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers moves to the meta device (buffers stay put).

    Parameter constructors still call `torch.empty` on the host, which reserves but never touches memory,
    and initialisers then run on meta, at no cost.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # an already-meta one is a tied alias: keep it
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config) -> nn.Module:
    """An `AutoModelForCausalLM` of `config` with fp32 parameters on the meta device and real buffers."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers a state dict leaves out, by qualified name."""
    out = {}
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buf = sub._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().clone()
    return out


def materialize(module: nn.Module, param_device: torch.device, buffer_device: torch.device) -> None:
    """Allocate (uninitialised) storage for every meta parameter — only this rank's shards once sharded —
    on `param_device`; buffers go to `buffer_device`, non-persistent ones with their computed values."""
    keep = non_persistent_buffers(module)
    module.to_empty(device=param_device)
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != buffer_device:
                sub._buffers[name] = buf.to(buffer_device)
    for qualified, value in keep.items():
        owner, _, name = qualified.rpartition(".")
        module.get_submodule(owner)._buffers[name] = value.to(buffer_device)


def broadcast_config(config, d: Dist):
    """Rank 0's transformers config, rebuilt on every rank (the others pass None)."""
    from transformers import AutoConfig

    sent = [config.to_json_string(use_diff=False) if d.is_main else None]
    if d.enabled:
        dist.broadcast_object_list(sent, src=0)
    values = json.loads(sent[0])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def broadcast_weights(lm: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Load rank 0's full state dict `state` into `lm`'s shards on every rank (the others pass None).

    Collective. Each tensor goes out by itself, so a rank other than 0 holds at most one full tensor
    besides its shards. Raises RuntimeError for missing or unexpected keys.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(lm, state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def build_sharded(
    source: str | Path,
    d: Dist,
    device: torch.device,
    *,
    prepare: Callable[[nn.Module], nn.Module],
    weights: Callable[[nn.Module, nn.Module], None] | None = None,
    offload: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """(the LM, the module `prepare` made of it), sharded over the ranks with the weights of `source`.

    `prepare(lm)` runs on the meta-device LM before anything is allocated: it applies activation
    checkpointing, wraps the LM (the training step module) and shards the result (`ddp.shard`), and
    returns it. `weights(lm, step)`, when given, fills the shards instead of `source`'s weights (a
    sharded checkpoint, each rank reading its own part); `source` then only gives the config (a folder
    with config.json). With `offload`, the shards live in host memory. Collective: every rank calls it.
    """
    config = state = None
    if d.is_main:
        if weights is None:
            config, state = load_weights(source)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(source))
    lm = empty_model(broadcast_config(config, d))
    step = prepare(lm)
    materialize(step, torch.device("cpu") if offload else device, device)
    if weights is not None:
        weights(lm, step)
    else:
        broadcast_weights(lm, state)
        del state
    return lm, step
