"""Preference losses: DPO (Rafailov et al., 2023, arXiv 2305.18290, eq. 7) and WRPO (Yang et al., 2024,
"Weighted-Reward Preference Optimization for Implicit Model Fusion", arXiv 2412.03187).

    L = −log σ( β·[ (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) ] )

averaged over the pairs. In implicit fusion the reference π_ref is the SFT model (FuseChat-3.0), whose
log-probs are computed once before DPO and stored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPOOutput:
    loss: "object"  # scalar tensor: the mean loss over pairs
    losses: "object"  # [B] each pair's loss (with its graph; the engine sums them)
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
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return DPOOutput(losses.mean(), losses, (beta * chosen).detach(), (beta * rejected).detach())


def wrpo_loss(policy_source, policy_self, policy_rejected, ref_source, ref_self, ref_rejected, beta: float, alpha: float) -> DPOOutput:
    """WRPO loss from sequence log-probs, each a float tensor [B].

        L = −log σ( α·β·Δ(y_ws) + (1 − α)·β·Δ(y_wt) − β·Δ(y_l) ),   Δ(y) = log π(y|x) − log π_ref(y|x)

    y_ws: the best response over the sources; y_wt: the best of the SFT model's own samples; y_l: the
    worst of those. α (the fusion coefficient, 0 ≤ α ≤ 1) moves the preferred side from the target's own
    answer (α = 0: DPO on (y_wt, y_l)) to the sources' (α = 1: DPO on (y_ws, y_l)). `chosen_reward` is
    the weighted reward of the two preferred answers.
    """
    import torch.nn.functional as F

    shapes = {tuple(t.shape) for t in (policy_source, policy_self, policy_rejected, ref_source, ref_self, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"wrpo_loss: log-prob tensors must share one shape [B], got {sorted(shapes)}")
    if beta <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"wrpo_loss: need beta > 0 and 0 ≤ alpha ≤ 1, got beta={beta}, alpha={alpha}")
    chosen = alpha * (policy_source - ref_source) + (1 - alpha) * (policy_self - ref_self)
    rejected = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return DPOOutput(losses.mean(), losses, (beta * chosen).detach(), (beta * rejected).detach())
