"""The order an epoch reads windows in: row groups shuffled, then windows shuffled inside a buffer of groups.

A fully random permutation of a Parquet store decodes a whole row group (32 windows of 2,048 tokens)
for each window it uses. Here the row groups are permuted, cut into buffers of `buffer_groups`
consecutive groups, and the windows of each buffer permuted: every group is decoded once per epoch
(per rank), and a micro-batch still mixes windows of up to `buffer_groups` far-apart places of the
corpus. The order is a pure function of (group sizes, seed, epoch), so resume and DDP stay exact.
"""

from __future__ import annotations

import numpy as np

BUFFER_GROUPS = 8  # ≈ 256 windows of 2,048 tokens mixed at a time


def buffered_order(n: int, bounds: np.ndarray | None, seed: int, epoch: int, buffer_groups: int = BUFFER_GROUPS) -> np.ndarray:
    """Store-order window indices, int64 [n], in the order epoch `epoch` reads them.

    `bounds`: group g holds windows [bounds[g], bounds[g+1]) (int [groups + 1], from 0 to n). None
    means one permutation of all n windows (windows already in memory, where nothing is decoded).
    """
    rng = np.random.default_rng([seed, epoch])
    if bounds is None:
        return rng.permutation(n)
    bounds = np.asarray(bounds, dtype=np.int64)
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != n or np.any(np.diff(bounds) < 0):
        raise ValueError(f"group bounds must rise from 0 to {n}, got {bounds[:4].tolist()}…{bounds[-2:].tolist()}")
    groups = rng.permutation(len(bounds) - 1)
    parts = []
    for lo in range(0, len(groups), max(1, int(buffer_groups))):
        windows = np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in groups[lo : lo + buffer_groups]])
        parts.append(windows[rng.permutation(len(windows))])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
