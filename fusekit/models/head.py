"""The output layer apart from the model body: the last hidden states without [B, L, V] logits.

A causal LM whose `get_output_embeddings()` is an `nn.Linear` applied to the last hidden state can run
with that layer fed an empty slice (`capture_head_input` keeps what it would have read), and its logits
computed later, a few positions at a time. Training's fused losses and extraction's top-k both do so.
`output_layer_problem` checks that the logits really are that layer's output (by the config and on 4
tokens through the model): models that transform them after the layer (Gemma-2's soft-capping, Cohere's
logit scale, …) fail and keep the logits path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def output_layer(lm: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain `nn.Linear`, else None."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


class capture_head_input:
    """Within the block, the output layer receives an empty slice of its input and the input is kept."""

    def __init__(self, head: nn.Module):
        self.head, self.seen, self._handle = head, [], None

    def _hook(self, _module, args):
        self.seen.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    def __enter__(self) -> list[torch.Tensor]:
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self.seen

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def probe_ids(lm: nn.Module, device: torch.device) -> torch.Tensor:
    """4 token ids spread over the vocabulary, int64 [1, 4]: the input `head_probe` runs."""
    vocab = lm.get_output_embeddings().out_features
    return (torch.arange(4, device=device) * 7919 % vocab)[None]


def head_probe(lm: nn.Module, head: nn.Linear, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's logits, the output layer applied to the hidden states it receives) for `ids`."""
    logits = lm(input_ids=ids, use_cache=False).logits
    with capture_head_input(head) as seen:
        lm(input_ids=ids, use_cache=False)
    return logits, head(seen[0])


def not_linear(lm: nn.Module) -> str:
    """Why `output_layer(lm)` is None, in words."""
    kind = type(lm.get_output_embeddings()).__name__ if hasattr(lm, "get_output_embeddings") else "none"
    return f"its output layer is not a linear layer (get_output_embeddings() gives {kind})"


def head_mismatch(logits: torch.Tensor, again: torch.Tensor) -> str | None:
    """Why `head_probe`'s two results show that the output layer cannot stand in for the model's logits
    (None: it can): they differ beyond 1e-4."""
    logits, again = logits.float(), again.float()
    if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
        return "its logits are not the output layer applied to the last hidden state (the model transforms them)"
    return None


# Config fields of transformers architectures that change the logits after the output layer, with the
# value that leaves them unchanged: Gemma-2/3's soft-capping, Cohere's logit scale, Granite's divisor,
# Falcon-H1's multiplier. The 4-token probe alone can miss them where the probe's logits are small
# (tanh soft-capping at 30 changes logits below 1 by < 1e-4).
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0}


def transformed_by_config(lm: nn.Module) -> str | None:
    """Which config field makes `lm` transform its logits after the output layer (None: none does)."""
    config = getattr(lm, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    for cfg in filter(None, configs):
        for field, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, field, neutral)
            if value is not None and value != neutral:
                return f"its logits are not the output layer's: {field} = {value} transforms them after it"
    return None


Probe = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]


def _run_in_eval(lm: nn.Module, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """`probe(lm)` in eval mode without gradients; every module's mode is restored after."""
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()
    try:
        with torch.no_grad():
            return probe(lm)
    finally:
        for module, mode in modes:
            module.training = mode


def output_layer_problem(lm: nn.Module, device: torch.device, run: Callable[[Probe], tuple[torch.Tensor, torch.Tensor]] | None = None) -> str | None:
    """Why `lm`'s output layer cannot stand in for its logits (None: it can): not a linear layer, a config
    field that transforms the logits, or logits that differ from the layer's output on 4 tokens.

    `run(probe)` runs the probe (default: on `lm` in eval mode without gradients); a sharded model passes
    one that runs it inside the wrapping module's call (`train.head.FusionStep`).
    """
    head = output_layer(lm)
    if head is None:
        return not_linear(lm)
    if (reason := transformed_by_config(lm)) is not None:
        return reason
    ids = probe_ids(lm, device)

    def probe(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return head_probe(m, head, ids)

    return head_mismatch(*(run(probe) if run is not None else _run_in_eval(lm, probe)))


def head_usable(lm: nn.Module) -> bool:
    """Whether `lm`'s logits are its output layer applied to its last hidden state (`output_layer_problem`
    is None), checked once per model, then cached on the model."""
    cached = getattr(lm, "_fusekit_head", None)
    if cached is not None:
        return cached
    head = output_layer(lm)
    ok = head is not None and output_layer_problem(lm, head.weight.device) is None
    try:
        lm._fusekit_head = ok
    except AttributeError:
        pass
    return ok
