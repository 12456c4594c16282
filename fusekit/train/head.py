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

from fusekit.train.linear_loss import linear_fusion_loss, linear_token_logps
from fusekit.train.loss import IGNORE, fused_loss


def output_layer(lm: nn.Module) -> nn.Linear | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def head_problem(lm: nn.Module, device: torch.device) -> str | None:
    """Why the fused head cannot stand in for `lm(...).logits` (None: it can).

    Runs the model twice on 4 tokens in eval mode: logits must equal the output layer applied to the
    hidden states the layer receives.
    """
    head = output_layer(lm)
    if head is None:
        kind = type(lm.get_output_embeddings()).__name__ if hasattr(lm, "get_output_embeddings") else "none"
        return f"its output layer is not a linear layer (get_output_embeddings() gives {kind})"
    vocab = head.weight.shape[0]
    ids = (torch.arange(4, device=device) * 7919 % vocab)[None]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            logits = lm(input_ids=ids, use_cache=False).logits.float()
            with capture_head_input(head) as seen:
                lm(input_ids=ids, use_cache=False)
            again = head(seen[0]).float()
    finally:
        lm.train(was_training)
    if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
        return "its logits are not the output layer applied to the last hidden state (the model transforms them)"
    return None


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


class FusionStep(nn.Module):
    """`forward(batch tensors, lam, attention_mask)` → (total, clm, fusion) sums; `fused` picks the chunked head.

    The LM is this module's only child (`.lm`), so wrapping FusionStep in DDP/FSDP wraps the LM and the
    loss's use of the output weight happens inside the wrapped forward.
    """

    def __init__(self, lm: nn.Module, fused: bool):
        super().__init__()
        self.lm = lm
        self.fused = fused

    def forward(self, input_ids, position_ids, labels, target_ids, target_probs, lam: float, attention_mask=None):
        # attention_mask: unpacked, right-padded rows (models that cannot pack); None for packed rows.
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        if not self.fused:
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
            sums = fused_loss(logits, labels, target_ids, target_probs, lam)
        else:
            head = output_layer(self.lm)
            with capture_head_input(head) as seen:
                self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
            sums = linear_fusion_loss(seen[-1], head.weight, head.bias, labels, target_ids, target_probs, lam)
        return sums.total, sums.clm, sums.fusion



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
        with capture_head_input(head) as seen:
            self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return linear_token_logps(seen[-1][:, :-1], head.weight, head.bias, target).sum(-1)
