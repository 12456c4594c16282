"""The DPO loss (Rafailov et al., 2023, "Direct Preference Optimization", arXiv 2305.18290, eq. 7).

    L = −log σ( β·[ (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) ] )

averaged over the pairs. In implicit fusion the reference π_ref is the SFT model (FuseChat-3.0), whose
log-probs are computed once before DPO and stored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPOOutput:
    loss: "object"  # scalar tensor: the mean loss over pairs
    chosen_reward: "object"  # [B] β·(log π − log π_ref) of the chosen responses (detached)
    rejected_reward: "object"  # [B] same for the rejected ones


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> DPOOutput:
    """DPO loss from sequence log-probs, each a float tensor [B] (sums over response tokens).

    Raises ValueError when the four shapes differ or beta ≤ 0.
    """
    import torch.nn.functional as F

    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: log-prob tensors must share one shape [B], got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return DPOOutput(loss, (beta * chosen).detach(), (beta * rejected).detach())
