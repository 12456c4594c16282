"""λ·CLM + (1−λ)·fusion loss, gathered at the fused target's sparse ids.

The fusion term is FuseLLM's CE to the fused distribution (`loss="ce"`, below) or one of the
distillation losses of `divergence.py` (kl, reverse_kl, jsd, uld, gold), computed chunk by chunk.

The fused target has ≤ k·(K+1) non-zeros per position, so −Σ_v p(v)·log q(v) only needs log q at those
ids: log q(v) = z_v − logsumexp(z). Nothing of size [N, V] is built besides what plain cross-entropy
needs; the backward writes softmax(z)·c − (sparse target) straight into the one gradient buffer.

Every function returns sums over positions; the loop divides by the number of predicted tokens of the
whole optimizer step, so accumulation and DDP weigh every token alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusekit.train.divergence import LOSSES, chunk_loss_and_grad, scale_to_mass

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 26  # fp32 working set per chunk when logits are bf16/fp16 (256 MiB)


@dataclass
class LossSums:
    total: torch.Tensor  # differentiable sum of λ·clm + (1−λ)·fusion over positions
    clm: torch.Tensor  # detached sums, for logging
    fusion: torch.Tensor


def clm_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossSums:
    """Plain next-token cross-entropy (what λ = 1 trains on), summed; labels already shifted."""
    v = logits.shape[-1]
    total = F.cross_entropy(logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return LossSums(total, total.detach(), torch.zeros((), device=logits.device))


class _SparseFusedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ids, probs, lam: float):
        n = logits.shape[0]
        valid = labels != IGNORE
        safe_labels = labels.clamp(min=0)
        safe_ids = ids.clamp(min=0)  # empty slots carry probability 0, so any id will do
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        z_label = torch.empty(n, dtype=torch.float32, device=logits.device)
        z_dot = torch.empty(n, dtype=torch.float32, device=logits.device)
        for lo, hi in _chunks(logits):
            x = logits[lo:hi].float()
            lse[lo:hi] = torch.logsumexp(x, dim=-1)
            z_label[lo:hi] = x.gather(1, safe_labels[lo:hi, None])[:, 0]
            z_dot[lo:hi] = (probs[lo:hi] * x.gather(1, safe_ids[lo:hi])).sum(-1)
        mass = probs.sum(-1)
        clm = torch.where(valid, lse - z_label, 0.0).sum()
        fusion = (mass * lse - z_dot).sum()
        ctx.save_for_backward(logits, valid, safe_labels, safe_ids, probs, mass)
        ctx.lam = lam
        total = lam * clm + (1.0 - lam) * fusion
        ctx.mark_non_differentiable(clm, fusion)
        return total, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        logits, valid, labels, ids, probs, mass = ctx.saved_tensors
        lam = ctx.lam
        # d/dz [λ(lse − z_y) + (1−λ)(m·lse − Σ p·z_ids)] = (λ·valid + (1−λ)·m)·softmax(z) − λ·1[y] − (1−λ)·p@ids
        coef = (lam * valid.float() + (1.0 - lam) * mass) * grad_total
        hard = -lam * valid.float() * grad_total
        soft = -(1.0 - lam) * probs * grad_total
        chunks = list(_chunks(logits))
        grad = None if len(chunks) == 1 and logits.dtype == torch.float32 else torch.empty_like(logits)
        for lo, hi in chunks:
            # softmax(z) again rather than a saved [N, V] copy: one fused pass, no extra memory.
            g = torch.softmax(logits[lo:hi], dim=-1, dtype=torch.float32)
            g.mul_(coef[lo:hi, None])
            g.scatter_add_(1, labels[lo:hi, None], hard[lo:hi, None])
            g.scatter_add_(1, ids[lo:hi], soft[lo:hi])
            if grad is None:
                return g, None, None, None, None
            grad[lo:hi] = g
        return grad, None, None, None, None


def _chunks(logits: torch.Tensor, working_copies: int = 0):
    """(lo, hi) row ranges; `working_copies`: [c, V] buffers the caller makes per chunk (0: none for fp32)."""
    n, v = logits.shape
    # fp32 logits need no upcast copy, so one chunk is as cheap in memory as any split.
    if logits.dtype == torch.float32 and not working_copies:
        step = n
    else:
        step = max(1, _CHUNK_ELEMENTS // max(v * max(working_copies, 1), 1))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


class _SparseDivergence(torch.autograd.Function):
    """λ·CLM + (1−λ)·divergence from [N, V] logits, chunk by chunk (`divergence.chunk_loss_and_grad`):
    forward writes the logit gradient (the loss is a scalar), backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, ids, probs, lam: float, loss: str, beta):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        need = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need else None
        clm = torch.zeros((), dtype=dtype, device=logits.device)
        fusion = torch.zeros((), dtype=dtype, device=logits.device)
        for lo, hi in _chunks(logits, working_copies=2):
            z = logits[lo:hi].to(dtype, copy=True)  # the kernel writes the gradient into z
            c, f, g = chunk_loss_and_grad(z, labels[lo:hi], ids[lo:hi], probs[lo:hi], lam, loss, beta, need)
            clm += c
            fusion += f
            if need:
                grad[lo:hi] = g
        ctx.save_for_backward(grad if need else torch.empty(0))
        ctx.need = need
        ctx.mark_non_differentiable(clm, fusion)
        return lam * clm + (1.0 - lam) * fusion, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(grad.dtype) if ctx.need else None, None, None, None, None, None, None


def check_loss(loss: str, lam: float) -> None:
    """ValueError for a loss name outside `LOSSES` or λ outside [0, 1]."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")


def fused_loss(
    logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor | None, target_probs: torch.Tensor | None,
    lam: float, loss: str = "ce", beta: float | None = None, target_mass: torch.Tensor | None = None,
) -> LossSums:
    """Sums of λ·CLM + (1−λ)·fusion over positions.

    logits [..., V]; labels [...] (shifted next tokens, IGNORE where none); target_ids [..., m] int
    (−1 empty) and target_probs [..., m] (0 at empty slots and at positions without a label). λ = 1 is
    plain cross-entropy, with the fusion target not even read. `loss`: the fusion term — "ce"
    (FuseLLM's −Σ p·log q) or a divergence of `divergence.LOSSES` (`beta`: jsd's and gold's β).
    `target_mass` [...] (None: the rows as given): the teacher's mass on its ids; a divergence takes the
    teacher as target_probs scaled to sum to it, with 1 − mass in the rest bucket (`divergence.scale_to_mass`).
    `ce` ignores it: FuseLLM's CE is to the renormalised target. Raises ValueError for an unknown loss,
    λ outside [0, 1] or a missing target with λ < 1.
    """
    check_loss(loss, lam)
    if lam == 1.0 or target_ids is None:
        if lam != 1.0:
            raise ValueError("a fusion loss (lam < 1) needs target_ids and target_probs")
        return clm_loss(logits, labels)
    v = logits.shape[-1]
    m = target_ids.shape[-1]
    flat_labels = labels.reshape(-1)
    # The fusion term counts exactly where the CLM term does: positions with a next token.
    probs = target_probs.reshape(-1, m).float() * (flat_labels != IGNORE)[:, None]
    if loss != "ce":
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp64 logits (tests) keep fp64 targets
        probs = target_probs.reshape(-1, m).to(wide) * (flat_labels != IGNORE)[:, None]
        probs = scale_to_mass(probs, target_mass)
        total, clm, fusion = _SparseDivergence.apply(
            logits.reshape(-1, v), flat_labels.long(), target_ids.reshape(-1, m).long(), probs, float(lam), loss, beta
        )
        return LossSums(total, clm, fusion)
    total, clm, fusion = _SparseFusedCE.apply(
        logits.reshape(-1, v), flat_labels, target_ids.reshape(-1, m).long(), probs, float(lam)
    )
    return LossSums(total, clm, fusion)


def dense_fused_loss(
    logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor, lam: float
) -> LossSums:
    """The reference formulation with a dense [N, V] target (as FuseLLM's code does): tests and benchmarks."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v).float()
    logq = torch.log_softmax(x, -1)
    dense = torch.zeros_like(x)
    ids = target_ids.reshape(-1, target_ids.shape[-1]).long()
    valid = (labels.reshape(-1) != IGNORE)[:, None]
    dense.scatter_add_(1, ids.clamp(min=0), target_probs.reshape(ids.shape).float() * (ids >= 0) * valid)
    fusion = -(dense * logq).sum()
    clm = F.nll_loss(logq, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return LossSums(lam * clm + (1 - lam) * fusion, clm.detach(), fusion.detach())
