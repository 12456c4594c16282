"""Merge methods by name, mergekit-style: a method is one function in its own module plus one decorator.

A method sees one tensor at a time: the base's and each model's values (same shape, working dtype —
float32, or float64 for float64 inputs — on the merge device) and the per-model options, and returns the
merged values. Methods must not write into the base, nor into the models unless `owned` says the engine
handed over its own buffers (TensorInputs.task_vectors does the right thing either way).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from fusekit.merge.errors import MergeError

# The per-merge options a method may accept as arguments / CLI flags; the engine rejects the others, so a
# --density given to a method that ignores it is an error rather than a silent no-op.
OPTIONS = ("weights", "density", "t", "lambda", "normalize", "seed")
# Each option's name in a mergekit YAML, and whether it is set per model (True) or per merge (False).
OPTION_PARAMS = {"weights": ("weight", True), "density": ("density", True), "t": ("t", False),
                 "lambda": ("lambda", False), "normalize": ("normalize", False)}  # fmt: skip


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
    # Method-specific parameters under mergekit's names (rescale, epsilon, gamma, select_topk, …), resolved
    # for this tensor: one mapping for the merge, one per model.
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: tuple[Mapping[str, Any], ...] = ()
    has_base: bool = True  # False where the config names no base (nuslerp then interpolates the models themselves)
    # True when `models` are the engine's own buffers (fresh copies, or safetensors' private copy-on-write
    # mappings), which a method may overwrite — task vectors then take no extra memory.
    owned: bool = False

    def task_vectors(self) -> list[torch.Tensor]:
        """δ_j = θ_j − θ_base, in place of the models' buffers when the engine owns them, else as new tensors."""
        return [m.sub_(self.base) if self.owned else m - self.base for m in self.models]

    def param(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    def model_param(self, j: int, name: str, default: Any = None) -> Any:
        return self.model_params[j].get(name, default) if self.model_params else default

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
    parameters: Mapping[str, Any] = field(default_factory=dict)  # extra per-merge parameters → defaults
    model_parameters: Mapping[str, Any] = field(default_factory=dict)  # extra per-model parameters → defaults
    needs_base: bool = True  # False: a config may omit the base (linear, nuslerp)

    def parameter_names(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(per-merge, per-model) parameter names under mergekit's spelling → their defaults."""
        glob: dict[str, Any] = {}
        per_model: dict[str, Any] = {}
        defaults = {"weights": 1.0, "density": self.default_density, "t": 0.5, "lambda": 1.0,
                    "normalize": self.default_normalize}  # fmt: skip
        for option in OPTIONS:
            if option in self.options and option in OPTION_PARAMS:
                key, is_model = OPTION_PARAMS[option]
                (per_model if is_model else glob)[key] = defaults[option]
        glob.update(self.parameters)
        per_model.update(self.model_parameters)
        return glob, per_model


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
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Any] | None = None,
    needs_base: bool = True,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name` (mergekit's name where mergekit has the method).

    options: which of OPTIONS the caller may pass; parameters / model_parameters: further per-merge and
    per-model parameters a YAML may set (mergekit's names) with their defaults.
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for merge method {name!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise MergeError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(
            name, pretty_name, reference, fn, frozenset(options), min_models, max_models, default_normalize,
            default_density, dict(parameters or {}), dict(model_parameters or {}), needs_base,
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
