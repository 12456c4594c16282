"""Merge methods by name, mergekit-style: a method is one function in its own module plus one decorator.

A method sees one tensor at a time: the base's and each model's values (same shape, working dtype —
float32, or float64 for float64 inputs — on the merge device) and the per-model options, and returns the
merged values. Methods must not write into their inputs: a tensor read from safetensors may be a view
of the file's mapping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from fusekit.merge.errors import MergeError

# The per-merge options a method may accept; the engine rejects the others, so a --density given to a
# method that ignores it is an error rather than a silent no-op.
OPTIONS = ("weights", "density", "t", "lambda", "normalize", "seed")


@dataclass(frozen=True)
class TensorInputs:
    name: str
    base: torch.Tensor
    models: list[torch.Tensor]
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    t: float = 0.5
    lam: float = 1.0
    normalize: bool = False
    seed: int = 0

    def generator(self, model_index: int) -> torch.Generator:
        """A generator seeded by (seed, tensor name, model index), so random masks do not depend on order."""
        key = f"{self.seed}\x00{self.name}\x00{model_index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        g = torch.Generator(device=self.base.device)
        g.manual_seed(seed)
        return g


@dataclass
class Merged:
    tensor: torch.Tensor
    info: dict | None = None  # per-tensor facts a method reports (VaRM: its weights)


MethodFn = Callable[[TensorInputs], Merged]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    reference: str
    fn: MethodFn
    options: frozenset[str] = field(default_factory=frozenset)
    min_models: int = 1
    max_models: int | None = None
    default_normalize: bool = False
    default_density: float | None = None  # None with "density" in options: the user must give one


METHODS: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    pretty_name: str,
    reference: str,
    *,
    options: tuple[str, ...] = (),
    min_models: int = 1,
    max_models: int | None = None,
    default_normalize: bool = False,
    default_density: float | None = None,
) -> Callable[[MethodFn], MethodFn]:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for merge method {name!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise MergeError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(
            name, pretty_name, reference, fn, frozenset(options), min_models, max_models, default_normalize, default_density
        )
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def weighted_sum(tensors: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=w)
    return out
