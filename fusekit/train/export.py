"""The trained model as an ordinary Hugging Face folder: weights, config, generation config, tokenizer.

Shared by fusion training and the implicit-fusion stages. Under FSDP2 every rank writes its shards and
the ranks assemble the files (`sharded_state.export_model`), so no rank holds the whole model; otherwise
rank 0 saves the model it holds (several safetensors files + index above `EXPORT_SHARD_BYTES`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import fusekit.train.sharded_state as sharded_state
from fusekit.models.load import quiet_transformers
from fusekit.train.ddp import Dist


def write_hf_model(folder: Path, net: nn.Module, step_module: nn.Module, tokenizer, sharded: bool, d: Dist) -> None:
    """Write `net` (held whole, or sharded by FSDP2 inside `step_module` when `sharded`) and `tokenizer`
    (None: none) into `folder`, loadable with `from_pretrained`. Collective: every rank calls it."""
    if sharded:
        sharded_state.export_model(folder, step_module, net)
    if d.is_main:
        with quiet_transformers():
            if sharded:
                net.config.architectures = [type(net).__name__]
                net.config.dtype = next(net.parameters()).dtype
                net.config.save_pretrained(folder)
                if getattr(net, "generation_config", None) is not None:
                    net.generation_config.save_pretrained(folder)
            else:
                net.save_pretrained(folder, safe_serialization=True, max_shard_size=sharded_state.EXPORT_SHARD_BYTES)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
