"""Fusion rules by name, mergekit-style: adding a rule is one decorated function.

A rule sees only cross-entropies: `ce` is float64 [..., C] over the C = K+1 candidates (the target's
own distribution first), +inf where a candidate has no usable CE (an alignment fallback, or an empty
window). It returns weights of the same shape, summing to 1 over the last axis. The granularity is
decided by what the caller feeds it — one row of window mean CEs, or one row per token — so every rule
works at both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

RuleFn = Callable[[np.ndarray], np.ndarray]


class FusionError(ValueError):
    """A fusion rule or input that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class FusionRule:
    name: str
    pretty_name: str
    reference: str
    fn: RuleFn


FUSION_RULES: dict[str, FusionRule] = {}


def register_fusion(name: str, pretty_name: str, reference: str = "") -> Callable[[RuleFn], RuleFn]:
    def decorate(fn: RuleFn) -> RuleFn:
        if name in FUSION_RULES:
            raise FusionError(f"fusion rule {name!r} is already registered")
        FUSION_RULES[name] = FusionRule(name, pretty_name, reference, fn)
        return fn

    return decorate


def get_fusion(name: str) -> FusionRule:
    try:
        return FUSION_RULES[name]
    except KeyError:
        raise FusionError(f"unknown fusion rule {name!r}: choose one of {', '.join(sorted(FUSION_RULES))}") from None
