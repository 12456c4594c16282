"""DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density and rescale the survivors
by 1/density, then merge linearly (dare_linear: task arithmetic) or with TIES' sign election (dare_ties).

The masks come from a torch.Generator seeded by (seed, tensor name, model index): a merge is reproducible
and does not depend on the order tensors are visited (CPU and CUDA generators give different masks).
Rescaling is the paper's 1/density; mergekit instead rescales to keep each vector's L1 norm.
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.task_arithmetic import combine_deltas
from fusekit.merge.ties import elect_and_merge


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, *, inplace: bool = False) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    return delta.mul_(keep).div_(density) if inplace else delta * keep / density


def _dropped(x: TensorInputs) -> list[torch.Tensor]:
    return [drop_and_rescale(m - x.base, d, x.generator(j), inplace=True) for j, (m, d) in enumerate(zip(x.models, x.densities))]


@register_method(
    "dare_linear",
    "Linear DARE",
    "https://arxiv.org/abs/2311.03099",
    options=("weights", "density", "lambda", "normalize", "seed"),
)
def dare_linear(x: TensorInputs) -> Merged:
    return combine_deltas(x, _dropped(x))


@register_method(
    "dare_ties",
    "DARE TIES",
    "https://arxiv.org/abs/2311.03099",
    options=("weights", "density", "lambda", "normalize", "seed"),
)
def dare_ties(x: TensorInputs) -> Merged:
    return elect_and_merge(x, _dropped(x))
