"""Fused output layer + λ·CLM + (1−λ)·fusion loss, in chunks of positions: no [N, V] logits.

"Cut Cross-Entropy" (Wijmans et al., 2024, arXiv 2411.09009) and Liger Kernel's fused linear
cross-entropy (Hsu et al., 2024, arXiv 2410.10989) compute next-token cross-entropy from the final
hidden states and the output embedding without ever holding the [N, V] logits. This module extends the
same idea to FuseLLM's sparse fusion target (FUSION-METHOD.md §5): per chunk of positions it forms the
chunk's logits z = h·Wᵀ (+ b), reads logsumexp(z), z at the label and z at the ≤ k·(K+1) target ids, and
— since the loss is a scalar — writes the chunk's gradients at once (Liger's order: no second pass over
the logits in backward). Backward only scales the stored gradients by the incoming scalar.

    d/dz [λ(lse − z_y) + (1−λ)(m·lse − Σ p·z_ids)] = (λ·1[y valid] + (1−λ)·m)·softmax(z) − λ·1[y] − (1−λ)·p@ids

so dL/dh = G·W, dL/dW = Gᵀ·h, dL/db = Σ G per chunk, where G is the chunk's [c, V] logit gradient.

The distillation losses of `divergence.py` (kl, reverse_kl, jsd, uld, gold) go the same way
(`_LinearDivergence`): per chunk the logits z = h·Wᵀ (+ b), then `chunk_loss_and_grad` turns them into
the chunk's sums and its [c, V] logit gradient G, and the same three matmuls give dL/dh, dL/dW, dL/db.
Their chunks hold half the rows (two [c, V] working buffers).

Memory: one chunk of [c, V] fp32 (c·V ≤ `CHUNK_ELEMENTS`) besides the gradients of h, W and b. Precision:
the matmuls run in whatever autocast says (bf16 on GPU), the softmax and the sums in fp32.
"""

from __future__ import annotations

import torch

from fusekit.train.divergence import chunk_loss_and_grad, scale_to_mass
from fusekit.train.loss import IGNORE, LossSums, check_loss

CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}  # logits per chunk: 128 MiB / 1 GiB in fp32


def chunk_rows(n: int, v: int, device: torch.device, elements: int | None = None) -> int:
    """Positions per chunk so that a chunk's [rows, V] fp32 logits hold ≤ `elements` values.

    GPUs get larger chunks: each chunk adds its [V, H] weight gradient once, so fewer chunks cost less.
    """
    budget = elements or CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, min(n, budget // max(v, 1)))


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[str, torch.dtype]:
    """(device kind, dtype the chunk matmuls run in): autocast's dtype when autocast is on (bf16 on GPU),
    else the inputs' promoted dtype."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return kind, torch.get_autocast_dtype(kind)
    return kind, torch.promote_types(hidden.dtype, weight.dtype)


def _save_grads(ctx, hidden, weight, bias, grad_h, grad_w, grad_b) -> None:
    """Keep the gradients computed in forward for backward (an empty tensor where none was needed)."""
    ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
    ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)


def _saved_grads(ctx, grad_total) -> list:
    """The gradients of hidden, weight and bias, scaled by the upstream gradient of the loss (None where
    not needed)."""
    return [(t * grad_total).to(dtype) if has else None for t, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes)]


class _LinearFusionCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, probs, lam: float, rows: int):
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        valid = labels != IGNORE
        safe_labels = labels.clamp(min=0)
        with_target = ids is not None
        mass = probs.sum(-1) if with_target else torch.zeros(n, device=hidden.device)
        coef = lam * valid.float() + (1.0 - lam) * mass
        hard = -lam * valid.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        clm = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fusion = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kind, mm_dtype = _matmul_dtype(hidden, weight)
        w = weight.to(mm_dtype)  # cast once here, not once per chunk
        with torch.autocast(kind, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].to(mm_dtype)
                z = (h @ w.t()).float()
                if bias is not None:
                    z += bias.float()
                z_label = z.gather(1, safe_labels[lo:hi, None])[:, 0]
                z_ids = z.gather(1, ids[lo:hi]) if with_target else None
                # One exp pass: softmax in place of the logits, logsumexp from its normaliser.
                top = z.amax(dim=-1)
                e = z.sub_(top[:, None]).exp_()
                norm = e.sum(-1)
                lse = top + norm.log()
                clm += torch.where(valid[lo:hi], lse - z_label, 0.0).sum()
                if with_target:
                    fusion += (mass[lo:hi] * lse - (probs[lo:hi] * z_ids).sum(-1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = e.mul_((coef[lo:hi] / norm)[:, None])
                g.scatter_add_(1, safe_labels[lo:hi, None], hard[lo:hi, None])
                if with_target:
                    g.scatter_add_(1, ids[lo:hi], -(1.0 - lam) * probs[lo:hi])
                if need_b:
                    grad_b += g.sum(0)
                gm = g.to(mm_dtype)
                if need_h:
                    grad_h[lo:hi] = gm @ w
                if need_w:
                    if mm_dtype == torch.float32:
                        grad_w.addmm_(gm.t(), h)
                    else:
                        grad_w += (gm.t() @ h).float()
        total = lam * clm + (1.0 - lam) * fusion
        _save_grads(ctx, hidden, weight, bias, grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(clm, fusion)
        return total, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        return (*_saved_grads(ctx, grad_total), None, None, None, None, None)


class _LinearDivergence(torch.autograd.Function):
    """λ·CLM + (1−λ)·divergence through the output layer, chunk by chunk; gradients written in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, probs, lam: float, rows: int, loss: str, beta):
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        need = need_h or need_w or need_b
        kind, mm_dtype = _matmul_dtype(hidden, weight)
        acc = torch.promote_types(mm_dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (tests)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        clm = torch.zeros((), dtype=acc, device=hidden.device)
        fusion = torch.zeros((), dtype=acc, device=hidden.device)
        w = weight.to(mm_dtype)
        with torch.autocast(kind, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].to(mm_dtype)
                z = (h @ w.t()).to(acc)
                if bias is not None:
                    z += bias.to(acc)
                c, f, g = chunk_loss_and_grad(z, labels[lo:hi], ids[lo:hi], probs[lo:hi], lam, loss, beta, need)
                clm += c
                fusion += f
                if not need:
                    continue
                if need_b:
                    grad_b += g.sum(0)
                gm = g.to(mm_dtype)
                if need_h:
                    grad_h[lo:hi] = gm @ w
                if need_w:
                    grad_w += (gm.t() @ h).to(acc)
        total = lam * clm + (1.0 - lam) * fusion
        _save_grads(ctx, hidden, weight, bias, grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(clm, fusion)
        return total, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        return (*_saved_grads(ctx, grad_total), None, None, None, None, None, None, None)


def linear_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    lam: float,
    chunk_elements: int | None = None,
    loss: str = "ce",
    beta: float | None = None,
    target_mass: torch.Tensor | None = None,
) -> LossSums:
    """Sums over positions of λ·CLM + (1−λ)·fusion, from hidden states through the output layer.

    hidden [..., H] (the output layer's input; bf16 under autocast or fp32); weight [V, H] and bias [V]
    or None (the output embedding, tied or not); labels [...] int (shifted next tokens, IGNORE = −100
    where none); target_ids [..., m] int (−1 empty) and target_probs [..., m] float (0 at empty slots),
    or both None with λ = 1. Equals `fused_loss(hidden @ weight.T + bias, …)` in value and gradient (to
    fp32 rounding) without building [N, V]. Returns `LossSums` (differentiable total, detached parts).
    `loss`: the fusion term, "ce" (FuseLLM's) or a divergence of `divergence.LOSSES`; `beta`: jsd's and
    gold's β; `target_mass` [...] the teacher's mass on its ids, read by the divergences only (as in
    `loss.fused_loss`). Raises ValueError for an unknown loss, λ outside [0, 1] or a missing target with λ < 1.
    """
    check_loss(loss, lam)
    if target_ids is None and lam != 1.0:
        raise ValueError("a fusion loss (lam < 1) needs target_ids and target_probs")
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    ids = probs = None
    if target_ids is not None and lam < 1.0:
        m = target_ids.shape[-1]
        ids = target_ids.reshape(-1, m).long().clamp(min=0)  # empty slots carry probability 0
        # The fusion term counts exactly where the CLM term does: positions with a next token.
        wide = torch.float32 if loss == "ce" else torch.promote_types(hidden.dtype, torch.float32)  # fp64 in tests
        probs = target_probs.reshape(-1, m).to(wide) * (flat_labels != IGNORE)[:, None]
        if loss != "ce":
            probs = scale_to_mass(probs, target_mass)
    rows = chunk_rows(h.shape[0], weight.shape[0], h.device, chunk_elements)
    if loss != "ce" and ids is not None:
        rows = max(1, rows // 2)  # two [c, V] working buffers a chunk
        total, clm, fusion = _LinearDivergence.apply(h, weight, bias, flat_labels, ids, probs, float(lam), rows, loss, beta)
        return LossSums(total, clm, fusion)
    total, clm, fusion = _LinearFusionCE.apply(h, weight, bias, flat_labels, ids, probs, float(lam), rows)
    return LossSums(total, clm, fusion)


class _LinearTokenLogp(torch.autograd.Function):
    """log p(label) per position from hidden states through the output layer, chunk by chunk.

    Unlike the fusion loss, a sequence log-prob enters a non-linear loss (DPO's log σ), so the gradient
    per position is only known in backward: forward keeps nothing but the [N] log-probs and the chunk's
    logsumexp; backward recomputes each chunk's logits (one more [c, V] matmul per chunk, as Cut
    Cross-Entropy does) and applies  d logp_t / d z = 1[y_t] − softmax(z_t).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int):
        n = hidden.shape[0]
        valid = labels != IGNORE
        safe = labels.clamp(min=0)
        kind, mm_dtype = _matmul_dtype(hidden, weight)
        w = weight.to(mm_dtype)
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(kind, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                z = (hidden[lo:hi].to(mm_dtype) @ w.t()).float()
                if bias is not None:
                    z += bias.float()
                lse[lo:hi] = torch.logsumexp(z, dim=-1)
                logp[lo:hi] = torch.where(valid[lo:hi], z.gather(1, safe[lo:hi, None])[:, 0] - lse[lo:hi], 0.0)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse)
        ctx.has_bias, ctx.rows, ctx.mm_dtype = bias is not None, rows, mm_dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        mm_dtype, rows, n = ctx.mm_dtype, ctx.rows, hidden.shape[0]
        valid = labels != IGNORE
        safe = labels.clamp(min=0)
        g_out = torch.where(valid, grad_logp.float(), 0.0)
        w = weight.to(mm_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        kind = hidden.device.type
        with torch.autocast(kind, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].to(mm_dtype)
                z = (h @ w.t()).float()
                if ctx.has_bias:
                    z += bias.float()
                # dL/dz = g·(1[y] − softmax(z)), written in place of the chunk's logits
                g = z.sub_(lse[lo:hi, None]).exp_().mul_(-g_out[lo:hi, None])
                g.scatter_add_(1, safe[lo:hi, None], g_out[lo:hi, None])
                if need_b:
                    grad_b += g.sum(0)
                gm = g.to(mm_dtype)
                if need_h:
                    grad_h[lo:hi] = gm @ w
                if need_w:
                    grad_w += (gm.t() @ h).float()
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log p(labels) at every position from the output layer's input, without [N, V] logits.

    hidden [..., H] (bf16 under autocast, or fp32); weight [V, H], bias [V] or None; labels [...] int
    (the token each position predicts; IGNORE = −100 where none). Returns float32 [...]: log_softmax(
    hidden @ weight.T + bias) at the label, 0 where IGNORE — the values and gradients of the logits path
    (to fp32 rounding). Memory: one [c, V] chunk at a time (`chunk_rows`), in forward and in backward.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).long()
    rows = chunk_rows(h.shape[0], weight.shape[0], h.device, chunk_elements)
    return _LinearTokenLogp.apply(h, weight, bias, flat, rows).reshape(labels.shape)
