"""Activation checkpointing (`--gradient-checkpointing`): each transformer block keeps only its input.

A block's activations are dropped after its forward and recomputed from the kept input during backward,
so a step holds one block's activations plus one hidden state per block instead of every block's
intermediates: at 2,048 tokens the attention and MLP intermediates dominate a step's memory, and they
shrink by the number of blocks at the cost of one more forward per step.

This uses the model's own per-block mechanism (transformers' `GradientCheckpointingLayer`, each decoder
layer), non-reentrant (`torch.utils.checkpoint` with `use_reentrant=False`: no requires-grad input
needed, works with the fused head's hooks and with DDP's and FSDP2's gradient hooks, which stay outside
the recomputed region). The recomputation runs the same operations on the same inputs, so losses and
gradients are unchanged (tested). Call it before sharding or wrapping, on the bare LM.
"""

from __future__ import annotations

from torch import nn

from fusekit.train.config import TrainConfigError


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Checkpoint every transformer block of `lm` (an `AutoModelForCausalLM`), non-reentrant.

    Raises TrainConfigError naming the model class when it cannot (its class declares no support, or has
    no block that honours the flag).
    """
    name = type(lm).__name__
    refusal = (
        f"--gradient-checkpointing: {name} does not support activation checkpointing in transformers; "
        "train without --gradient-checkpointing"
    )
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise TrainConfigError(refusal)
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before activation_checkpointing_enable
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError:  # transformers found no module that checkpoints
        raise TrainConfigError(refusal) from None
    if not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules()):
        raise TrainConfigError(refusal)
