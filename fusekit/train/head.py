"""One training forward: the causal LM plus the loss (or the sequence log-probs), as one module that DDP
and FSDP can wrap: `FusionStep` for fusion training, `LogpStep` for SFT and DPO/WRPO.

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

from fusekit.models.head import capture_head_input, output_layer, output_layer_problem
from fusekit.models.identity import logit_size
from fusekit.models.packing import packing_supported
from fusekit.train.linear_loss import linear_fusion_loss, linear_token_logps
from fusekit.train.loss import IGNORE, fused_loss


def head_problem(lm: nn.Module, device: torch.device) -> str | None:
    """Why the fused head cannot stand in for `lm(...).logits` (None: it can); see `FusionStep.head_problem`."""
    return FusionStep(lm, fused=False).head_problem(device)


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
    """`forward(batch tensors, lam, attention_mask, target_mass)` → (total, clm, fusion) sums; `fused` picks
    the chunked head.

    `loss` names the fusion term (`divergence.LOSSES`: "ce" is FuseLLM's), `beta` jsd's and gold's β;
    `target_mass` [B, L] (None: 1) the teacher's mass on its ids, which the divergences read (`ce` does not).
    The LM is this module's only child (`.lm`), so wrapping FusionStep in DDP/FSDP wraps the LM and the
    loss's use of the output weight happens inside the wrapped forward.
    """

    def __init__(self, lm: nn.Module, fused: bool, loss: str = "ce", beta: float | None = None):
        super().__init__()
        self.lm = lm
        self.fused = fused
        self.loss, self.beta = loss, beta
        self._probe_fn = None  # set while a probe runs through this module's own call

    def forward(self, input_ids, position_ids, labels, target_ids, target_probs, lam: float, attention_mask=None, target_mass=None):
        if self._probe_fn is not None:
            return self._probe_fn(self.lm)
        # attention_mask: unpacked, right-padded rows (models that cannot pack); None for packed rows.
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        if not self.fused:
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
            sums = fused_loss(logits, labels, target_ids, target_probs, lam, self.loss, self.beta, target_mass)
        else:
            head = output_layer(self.lm)

            def loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
                return linear_fusion_loss(hidden, weight, bias, labels, target_ids, target_probs, lam,
                                          loss=self.loss, beta=self.beta, target_mass=target_mass)

            with loss_at_head(head, loss) as found:
                self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
            sums = found[-1]
        return sums.total, sums.clm, sums.fusion

    def _run_probe(self, probe):
        """`probe(lm)` run inside this module's own call, in eval mode and without gradients, so that it works
        on a sharded (FSDP2) FusionStep too — every rank must call it then. Modes are restored exactly."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        self._probe_fn = probe
        try:
            with torch.no_grad():
                return self(None, None, None, None, None, 0.0)
        finally:
            self._probe_fn = None
            for module, mode in modes:
                module.training = mode
            if hasattr(self, "reshard"):  # FSDP2 keeps the root unit gathered after a forward with no backward
                self.reshard()

    def head_problem(self, device: torch.device) -> str | None:
        """Why the fused head cannot stand in for `lm(...).logits` (None: it can): see
        `fusekit.models.head.output_layer_problem`, whose 4-token probe runs through this module's own call
        (`_run_probe`), so it is collective under FSDP2.
        """
        return output_layer_problem(self.lm, device, self._run_probe)

    def packing_supported(self) -> bool:
        """Whether the LM keeps attention inside packed windows (`fusekit.models.packing.packing_supported`,
        the check extraction makes). Collective under FSDP2 (`_run_probe`)."""
        return self._run_probe(lambda lm: packing_supported(lm, logit_size(lm.config)))


class LogpStep(nn.Module):
    """`forward(input_ids, attention_mask, labels)` → each sequence's log-prob of its labelled tokens,
    float32 [B] (log π(y | x) of SFT and DPO/WRPO); `fused` picks the chunked head.

    input_ids, attention_mask, labels: [B, L], right-padded; labels hold the token at each position
    where it is scored (a response token) and IGNORE elsewhere — unshifted: position t's logits score
    token t+1. The fused head computes log p from the hidden states chunk by chunk
    (`linear_token_logps`, never [B, L, V]); the logits path is `log_softmax(logits)` at the labels.
    """

    def __init__(self, lm: nn.Module, fused: bool):
        super().__init__()
        self.lm = lm
        self.fused = fused

    def forward(self, input_ids, attention_mask, labels):
        target = labels[:, 1:]
        mask = target != IGNORE
        if not self.fused:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return (logp * mask).sum(-1)
        head = output_layer(self.lm)

        def logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return linear_token_logps(hidden[:, :-1], weight, bias, target).sum(-1)

        # Inside the output layer's call, where FSDP2 has its weight gathered (see `loss_at_head`).
        with loss_at_head(head, logps) as found:
            self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return found[-1]
