"""Totals over an extraction store's sidecars (what `fusekit extract` prints and `fusekit inspect` shows)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fusekit.store.extract_format import CE_BIN, CE_BINS


def summarize(sidecars: Sequence[dict]) -> dict:
    """Totals over shards' sidecars: tokens, bytes/token, compression KL, kept mass, CE quantiles."""
    tokens = sum(int(s.get("tokens", 0)) for s in sidecars)
    predicted = sum(int(s.get("predicted", 0)) for s in sidecars)
    file_bytes = sum(int(s.get("bytes", 0)) for s in sidecars)
    payload = sum(int(s.get("payload_bytes", 0)) for s in sidecars)
    hist = np.zeros(CE_BINS, dtype=np.int64)
    for s in sidecars:
        hist += np.asarray(s.get("ce_hist") or [0] * CE_BINS, dtype=np.int64)
    out = {
        "shards": len(sidecars),
        "windows": sum(int(s.get("windows", 0)) for s in sidecars),
        "tokens": tokens,
        "bytes": file_bytes,
        "bytes_per_token": file_bytes / tokens if tokens else math.nan,
        "payload_bytes_per_token": payload / tokens if tokens else math.nan,
        "kl_mean": sum(float(s.get("kl_sum", 0.0)) for s in sidecars) / tokens if tokens else math.nan,
        "kl_max": max((float(s.get("kl_max", 0.0)) for s in sidecars), default=math.nan),
        "mass_mean": sum(float(s.get("mass_sum", 0.0)) for s in sidecars) / tokens if tokens else math.nan,
        "ce_mean": sum(float(s.get("ce_sum", 0.0)) for s in sidecars) / predicted if predicted else math.nan,
        "ce_hist": hist.tolist(),
    }
    out["ce_quantiles"] = {q: histogram_quantile(hist, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    return out


def histogram_quantile(hist: np.ndarray, q: float) -> float:
    """The q-quantile of the CE histogram, linear within a bin."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    target = q * total
    cum = 0
    for i, c in enumerate(hist.tolist()):
        if c and cum + c >= target:
            return (i + (target - cum) / c) * CE_BIN
        cum += c
    return CE_BINS * CE_BIN
