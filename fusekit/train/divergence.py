"""The distillation losses other than FuseLLM's CE, per chunk of logits, with their gradient: no [N, V] at once.

Every loss compares the student q = softmax(z) with the fused teacher target p (sparse: ids [c, m], probs
[c, m], the ids *target*-vocabulary ids after the transfer). The teacher's support S is its slots with
p > 0 (equal ids summed); the mass outside — the teacher's p_rest = max(0, 1 − Σ p) and the student's
q_rest = Σ_{v ∉ S} q(v) — is one more bucket, so each divergence is taken between two distributions on
|S| + 1 outcomes: finite, and exact when S holds everything either side puts mass on.

Where the teacher's p comes from: the aligned store keeps each candidate's top-k renormalised, and since
format version 3 also the mass those k entries held before (`c{c}_mass`: for the target Σ exp(topk_logp),
for a 1:1-carried source its source row's, for the byte-span transfer the transferred row's mass before
its renormalisation; docs/ALIGN.md). Fusion blends that mass with the rows (`fuse.SparseTarget.mass`), and
the loss entry points scale each fused row to sum to it (`scale_to_mass`), so Σ p = mass and
p_rest = 1 − mass: the mass the teachers' top-k left out (≈ 0.23 per position for SmolLM2-135M at k = 10).
A version-2 store records no mass: there p_rest is 0, as before (the trainer warns once).

    kl          KL(p‖q) = Σ p·log(p/q) on S ∪ {rest} (forward KL; Hinton et al. 2015, GKD β = 0). With
                p_rest = 0 its gradient is `ce`'s; with the mass it differs wherever the teacher's rest > 0.
    reverse_kl  KL(q‖p) (Gu et al. 2024, MiniLLM; GKD β = 1). Where the teacher's rest is 0 (a one-hot
                fallback, a top-k that held everything, a version-2 store) KL(q‖p) would be infinite for any
                student with mass outside S: the teacher's rest is floored at `REVERSE_KL_REST_FLOOR` (its
                top-k scaled to sum 1 − floor) there, for this loss alone; a rest above the floor is kept.
    jsd         generalized JSD of GKD (Agarwal et al. 2024, arXiv 2306.13649, eq. 1) in TRL's convention
                (`GKDTrainer.generalized_jsd_loss`): M = β·p + (1−β)·q, JSD_β = β·KL(p‖M) + (1−β)·KL(q‖M);
                it tends to KL(p‖q)·β and KL(q‖p)·(1−β) at the ends, which is why β lies in (0, 1) here.
    uld         Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): Σ_i |p_(i) − q_(i)|,
                the L1 distance between both distributions sorted by value, zero-padded to one length. Taken
                on the *transferred* teacher (what the store holds, position-aligned by the transfer, the
                distribution MinCE/AvgCE pick or blend) — ULD ignores ids, so the sorted values are the
                source's own top-k up to the transfer's 1:n/n:1 chain rule. The teacher is p on S plus its
                rest as one atom, zeros beyond; the student's sorted vector is its top-(m+1) over the full
                vocabulary and zeros-matched tail, so Σ_{i>m+1} q_(i) = 1 − Σ top = the exact padded sum.
    gold        GOLD's hybrid (TRL `GOLDTrainer`, `uld_use_hybrid_loss`, fixed weights 1 and 1): JSD_β,
                element-wise on the ids the transfer maps (TRL's `_compute_jsd_loss_for_matched_tokens`:
                Σ_{i∈S} β·p·log(p/M) + (1−β)·q·log(q/M), no renormalisation), plus ULD on what it cannot map:
                the teacher's unmapped mass (its rest, one atom: the store records no finer split) against
                the student's probabilities outside S, sorted: |p_rest − r₁| + (q_rest − r₁), r₁ = the
                student's largest probability outside S. The store records no per-position transfer kind
                (1:1 / 1:n / n:1), so "mapped" is the target-vocabulary mass S and "unmapped" the rest.

Gradients: each loss is a function of a few log-probabilities of the student — log q at the support ids,
log q_rest, and (uld, gold) log q at the student's top ids — each either z_i − lse or lse_rest − lse. The
per-row loss is differentiated with autograd on those [c, m+1] values (a), and the chain rule gives the
chunk's logit gradient in closed form:

    dL/dz = −(Σ a)·softmax(z) + a_rest·softmax_rest(z) + Σ_points a_i·1[v = id_i]

with softmax_rest the softmax over the ids outside S (0 on S). Two [c, V] buffers per chunk.
"""

from __future__ import annotations

import math

import torch

from fusekit.train.loss_names import BETA_LOSSES, GOLD_DEFAULT_BETA, LOSSES  # noqa: F401  (re-exported)

IGNORE = -100
REVERSE_KL_REST_FLOOR = 1e-3  # the teacher's rest mass for reverse_kl where the store leaves it 0


def merge_equal_ids(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's equal ids summed into one slot; slots without mass (p ≤ 0 or id < 0) become (−1, 0).

    ids int64 [c, m], probs float [c, m] → the same shapes. Fusion already sums equal ids; this keeps the
    support a set for any caller (the dense reference scatters, so a repeated id counts once, summed).
    """
    live = (ids >= 0) & (probs > 0)
    big = torch.iinfo(torch.int64).max
    key = torch.where(live, ids, big)
    key, order = key.sort(dim=1)
    p = torch.where(live, probs, 0).gather(1, order)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    if bool(starts.all()):
        return torch.where(key == big, -1, key), p
    seg = starts.long().cumsum(1) - 1
    out_p = torch.zeros_like(p).scatter_add_(1, seg, p)
    out_ids = torch.full_like(key, big).scatter_(1, seg, key)
    out_ids = torch.where((out_ids == big) | (out_p <= 0), -1, out_ids)
    return out_ids, torch.where(out_ids >= 0, out_p, 0)


def scale_to_mass(probs: torch.Tensor, mass: torch.Tensor | None) -> torch.Tensor:
    """The teacher's probabilities on its ids: each row of `probs` [c, m] scaled to sum to `mass` (c values,
    in any shape: [B, L] from a batch).

    The fused target's rows are renormalised (they sum to 1, or 0 where there is no target); `mass` is
    what the teacher held on those ids before (`fuse.SparseTarget.mass`), so the rest bucket below is
    1 − mass. None: the rows as given (a teacher whole on its ids, or probs already scaled by the caller).
    """
    if mass is None:
        return probs
    total = probs.sum(-1)
    mass = mass.reshape(-1)
    scale = torch.where(total > 0, mass.to(probs.dtype) / torch.where(total > 0, total, 1.0), 0.0)
    return probs * scale[:, None]


def teacher_buckets(probs: torch.Tensor, loss: str, rest_exists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p on the support [c, m], p_rest [c]) for `loss`: p_rest = max(0, 1 − Σp) (Σp = the teacher's mass,
    `scale_to_mass`), raised to `REVERSE_KL_REST_FLOOR` for reverse_kl where it is below.

    rest_exists bool [c]: whether any id lies outside the support. Where none does (the support is the
    whole vocabulary) the teacher's rest can only be rounding, and is 0: every loss is then exact.
    """
    mass = probs.sum(-1)
    rest = torch.where(rest_exists, (1.0 - mass).clamp(min=0.0), 0.0)
    if loss == "reverse_kl":
        floor = rest_exists.to(rest.dtype) * REVERSE_KL_REST_FLOOR
        new_rest = torch.maximum(rest, floor)
        scale = torch.where(mass > 0, (1.0 - new_rest) / mass.clamp(min=1e-30), 0.0)
        return probs * torch.minimum(scale, torch.ones_like(scale))[:, None], new_rest
    return probs, rest


def _xlogy_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x·(log x − log y), 0 where x = 0 (log_x may be −inf there), without NaN gradients."""
    pos = x > 0
    return torch.where(pos, x * (torch.where(pos, log_x, 0.0) - torch.where(pos, log_y, 0.0)), 0.0)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp(min=torch.finfo(x.dtype).tiny).log(), -math.inf)


def _jsd_terms(p, log_p, q, log_q, beta: float) -> torch.Tensor:
    """Element-wise β·p·log(p/M) + (1−β)·q·log(q/M), M = β·p + (1−β)·q (log M from the logs, stably)."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _xlogy_ratio(p, log_p, log_m) + (1.0 - beta) * _xlogy_ratio(q, log_q, log_m)


def row_losses(loss: str, beta: float | None, p: torch.Tensor, p_rest: torch.Tensor, log_q: torch.Tensor,
               log_q_rest: torch.Tensor, log_q_top: torch.Tensor | None, log_r1: torch.Tensor | None) -> torch.Tensor:
    """Per-row loss [c] from the teacher buckets and the student's log-probabilities.

    p [c, m] (0 off the support), p_rest [c]; log_q [c, m] student log q at the support ids (any value
    off the support), log_q_rest [c] (−inf: nothing outside S); log_q_top [c, k] the student's top-k
    log-probs over the full vocabulary, by decreasing value (uld); log_r1 [c] the student's largest
    log-prob outside S (gold; −inf when S is everything).
    """
    on = p > 0
    q = torch.where(on, log_q.exp(), 0.0)
    log_q = torch.where(on, log_q, -math.inf)
    q_rest = log_q_rest.exp()
    log_p, log_p_rest = _safe_log(p), _safe_log(p_rest)
    if loss == "kl":
        return _xlogy_ratio(p, log_p, log_q).sum(-1) + _xlogy_ratio(p_rest, log_p_rest, log_q_rest)
    if loss == "reverse_kl":
        return _xlogy_ratio(q, log_q, log_p).sum(-1) + _xlogy_ratio(q_rest, log_q_rest, log_p_rest)
    if loss == "jsd":
        return _jsd_terms(p, log_p, q, log_q, beta).sum(-1) + _jsd_terms(p_rest, log_p_rest, q_rest, log_q_rest, beta)
    if loss == "uld":
        teacher = torch.cat([p, p_rest[:, None]], dim=1).sort(dim=1, descending=True).values
        top = log_q_top.exp()
        k = min(teacher.shape[1], top.shape[1])
        tail = (1.0 - top.sum(-1)).clamp(min=0.0)  # the student's sorted values beyond its top-k face zeros
        return (teacher[:, :k] - top[:, :k]).abs().sum(-1) + teacher[:, k:].sum(-1) + tail
    if loss == "gold":
        matched = _jsd_terms(p, log_p, q, log_q, beta).sum(-1)
        r1 = log_r1.exp()
        unmatched = (p_rest - r1).abs() + (q_rest - r1).clamp(min=0.0)
        return matched + unmatched
    raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")


def chunk_loss_and_grad(z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, lam: float,
                        loss: str, beta: float | None, need_grad: bool = True):
    """One chunk's (clm sum, fusion sum, dL/dz or None) for λ·CLM + (1−λ)·`loss`, L summed over rows.

    z [c, V] float32/64 logits (overwritten: the gradient is written into it); labels int64 [c] (IGNORE:
    no CLM term); ids int64 [c, m] (−1 or p = 0: empty) and probs [c, m] — rows of zero mass carry no
    fusion term (positions without a label or without a target). Returns 0-d sums and [c, V] (z's storage).
    """
    c, v = z.shape
    valid = labels != IGNORE
    safe_labels = labels.clamp(min=0)
    ids, probs = merge_equal_ids(ids, probs.to(z.dtype))
    has = probs.sum(-1) > 0
    on = probs > 0
    safe_ids = ids.clamp(min=0)
    lse = torch.logsumexp(z, dim=-1)
    clm = torch.where(valid, lse - z.gather(1, safe_labels[:, None])[:, 0], 0.0).sum()
    # The complement of the support, for q_rest (logsumexp over it: exact however close Σ q_S is to 1).
    # Empty slots point at the row's first slot (live whenever the row has a support: merge sorts them first).
    mask_ids = torch.where(on, ids, ids[:, :1]).clamp(min=0)
    in_support = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(1, mask_ids, on | on[:, :1])
    z_rest = z.masked_fill(in_support, -math.inf)
    del in_support
    lse_rest = torch.logsumexp(z_rest, dim=-1)
    p, p_rest = teacher_buckets(probs, loss, torch.isfinite(lse_rest))
    stats = {"log_q": z.gather(1, safe_ids) - lse[:, None], "log_q_rest": lse_rest - lse}
    point_ids = {"log_q": safe_ids}
    if loss == "uld":
        k = min(v, ids.shape[1] + 1)
        top_z, top_ids = z.topk(k, dim=-1)
        stats["log_q_top"], point_ids["log_q_top"] = top_z - lse[:, None], top_ids
    if loss == "gold":
        r_z, r_id = z_rest.max(dim=-1)
        stats["log_r1"], point_ids["log_r1"] = (r_z - lse)[:, None], r_id[:, None]
    leaves = {k: t.detach().requires_grad_(need_grad) for k, t in stats.items()}
    with torch.enable_grad():
        per_row = row_losses(loss, beta, p, p_rest, leaves["log_q"], leaves["log_q_rest"], leaves.get("log_q_top"),
                             leaves["log_r1"][:, 0] if "log_r1" in leaves else None)
        fusion = torch.where(has, per_row, 0.0).sum()
        grads = torch.autograd.grad(fusion, list(leaves.values()), allow_unused=True) if need_grad else None
    fusion = fusion.detach()
    if not need_grad:
        return clm, fusion, None
    # Rows without a target get no fusion gradient; 0·∞ in a bucket that holds no mass on either side is 0.
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves.values(), grads)]  # uld: no log_q
    a = {k: torch.where(has.view(-1, *([1] * (g.dim() - 1))), torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
         for k, g in zip(leaves, grads)}
    a_rest = a.pop("log_q_rest") * (1.0 - lam)
    total_a = a_rest + sum(g.sum(-1) for g in a.values()) * (1.0 - lam)
    # softmax over the complement, written in place of z_rest (0 on the support; 0 when S is everything)
    finite = torch.isfinite(lse_rest)
    z_rest.sub_(torch.where(finite, lse_rest, 0.0)[:, None]).exp_().mul_(a_rest[:, None])
    g = z.sub_(lse[:, None]).exp_().mul_((lam * valid.to(z.dtype) - total_a)[:, None])
    g.add_(z_rest)
    g.scatter_add_(1, safe_labels[:, None], (-lam * valid.to(z.dtype))[:, None])
    for key, grad in a.items():
        g.scatter_add_(1, point_ids[key], grad * (1.0 - lam))
    return clm, fusion, g
