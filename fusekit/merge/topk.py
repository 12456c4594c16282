"""The k largest entries of a flat tensor, exactly and with little extra memory: TIES's trim, Model
Breadcrumbs' magnitude band and SCE's variance selection all pick entries this way."""

from __future__ import annotations

import math

import torch

_SAMPLE = 1 << 16  # entries kth_largest samples to bracket its answer on large tensors


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor, exactly, in a few passes and little extra memory.

    torch.kthvalue copies the values and an int64 index per entry (3× the tensor); here a strided sample
    brackets the answer, one pass counts what lies below the bracket, and kthvalue runs on the bracket only.
    A bracket that misses (very uneven data) falls back to kthvalue on everything.
    """
    n = values.numel()
    rank = n - k + 1  # the answer's rank from the bottom (1-based)
    if n <= 4 * _SAMPLE:
        return values.kthvalue(rank).values
    sample = values[:: n // _SAMPLE].contiguous()
    m = sample.numel()
    p = rank / n
    margin = 6 * math.sqrt(m * p * (1 - p)) + 2
    lo = sample.kthvalue(max(1, int(p * m - margin))).values
    hi = sample.kthvalue(min(m, int(p * m + margin) + 1)).values
    below = int(torch.count_nonzero(values < lo))
    band = values[(values >= lo) & (values <= hi)]
    if below < rank <= below + band.numel():
        return band.kthvalue(rank - below).values
    return values.kthvalue(rank).values


def top_k_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of a flat tensor (ties at the threshold: lowest index first)."""
    n = mag.numel()
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    threshold = kth_largest(mag, k)
    keep = mag > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        at = (mag == threshold).nonzero().reshape(-1)[:missing]
        keep[at] = True
    return keep
