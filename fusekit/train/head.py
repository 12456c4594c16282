"""One training forward: the causal LM plus the loss, as one module that DDP and FSDP can wrap.

With the fused head, the LM runs with its output layer fed an empty slice (a forward pre-hook keeps the
hidden states it would have read), and `linear_fusion_loss` applies the output layer chunk by chunk:
no [B, L, V] logits. Any `AutoModelForCausalLM` whose `get_output_embeddings()` is an `nn.Linear`
applied to the last hidden state qualifies; `head_problem` checks that on a 4-token probe, so models
that transform logits after the head (Gemma-2's soft-capping, Cohere's logit scale, …) are caught and
take the logits path.
"""

from __future__ import annotations

import torch
from torch import nn

from fusekit.train.linear_loss import linear_fusion_loss
from fusekit.train.loss import fused_loss


def output_layer(lm: nn.Module) -> nn.Linear | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def head_problem(lm: nn.Module, device: torch.device) -> str | None:
    """Why the fused head cannot stand in for `lm(...).logits` (None: it can); see `FusionStep.head_problem`."""
    return FusionStep(lm, fused=False).head_problem(device)


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


class loss_at_head(capture_head_input):
    """Within the block, the output layer receives an empty slice of its input, and `loss(hidden, weight,
    bias)` is computed on the full input, from inside the layer's call.

    Inside the call is where FSDP2 has the layer's weight gathered when the layer is a unit of its own:
    the fused loss computes the weight's gradient right there (`linear_fusion_loss` needs no weight in
    backward), so the unit can drop the gathered weight as soon as the layer returns instead of keeping
    it through the whole backward.
    """

    def __init__(self, head: nn.Module, loss):
        super().__init__(head)
        self.loss = loss

    def _hook(self, module, args):
        self.seen.append(self.loss(args[0], module.weight, module.bias))
        return (args[0][..., :0, :],) + tuple(args[1:])


class FusionStep(nn.Module):
    """`forward(batch tensors, lam)` → (total, clm, fusion) sums; `fused` picks the chunked head.

    The LM is this module's only child (`.lm`), so wrapping FusionStep in DDP/FSDP wraps the LM and the
    loss's use of the output weight happens inside the wrapped forward.
    """

    def __init__(self, lm: nn.Module, fused: bool):
        super().__init__()
        self.lm = lm
        self.fused = fused
        self._probing = False

    def forward(self, input_ids, position_ids, labels, target_ids, target_probs, lam: float):
        if self._probing:
            return self._probe(input_ids)
        if not self.fused:
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            sums = fused_loss(logits, labels, target_ids, target_probs, lam)
        else:
            head = output_layer(self.lm)

            def loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
                return linear_fusion_loss(hidden, weight, bias, labels, target_ids, target_probs, lam)

            with loss_at_head(head, loss) as found:
                self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            sums = found[-1]
        return sums.total, sums.clm, sums.fusion

    def _probe(self, input_ids):
        """(the LM's logits, its output layer applied to the hidden states that layer received)."""
        head = output_layer(self.lm)
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        with capture_head_input(head) as seen:
            self.lm(input_ids=input_ids, use_cache=False)
        return logits, head(seen[0])

    def head_problem(self, device: torch.device) -> str | None:
        """Why the fused head cannot stand in for `lm(...).logits` (None: it can).

        Runs the model twice on 4 tokens in eval mode: logits must equal the output layer applied to the
        hidden states the layer receives. The probe goes through this module's own call, so it works
        on a sharded (FSDP2) FusionStep too — every rank must call it then.
        """
        lm = self.lm
        head = output_layer(lm)
        if head is None:
            kind = type(lm.get_output_embeddings()).__name__ if hasattr(lm, "get_output_embeddings") else "none"
            return f"its output layer is not a linear layer (get_output_embeddings() gives {kind})"
        vocab = lm.get_output_embeddings().out_features
        ids = (torch.arange(4, device=device) * 7919 % vocab)[None]
        modes = [(m, m.training) for m in self.modules()]  # restored exactly: the caller's, not ours
        self.eval()
        self._probing = True
        try:
            with torch.no_grad():
                logits, again = self(ids, None, None, None, None, 0.0)
        finally:
            self._probing = False
            for module, mode in modes:
                module.training = mode
            if hasattr(self, "reshard"):  # FSDP2 keeps the root unit gathered after a forward with no backward
                self.reshard()
        logits, again = logits.float(), again.float()
        if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
            return "its logits are not the output layer applied to the last hidden state (the model transforms them)"
        return None
