"""DARE (Yu et al. 2024, arXiv:2311.03099): drop each task-vector entry with probability 1 − density, rescale
the survivors, then merge linearly (dare_linear: task arithmetic) or with TIES' sign election (dare_ties).

Rescaling is mergekit's (`rescale: true`, the default): one factor per tensor that restores the task
vector's L1 norm, ‖δ‖₁ / ‖mask ⊙ δ‖₁ — not the paper's 1/density per entry, though the two agree in
expectation on large tensors. `rescale: false` keeps the survivors as they are.
The masks come from a torch.Generator seeded by (seed, tensor name, model index): a merge is reproducible
and does not depend on the order tensors are visited (CPU and CUDA generators give different masks), but
cannot reproduce mergekit's masks bit for bit (it draws from torch's global generator).
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.sparsify import bernoulli_drop
from fusekit.merge.task_arithmetic import combine_deltas
from fusekit.merge.ties import elect_and_merge

DARE_PARAMS = {"rescale": True, "int8_mask": False}


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True) -> torch.Tensor:
    """One DARE task vector: entries kept with probability `density`, then (rescale) scaled to keep ‖δ‖₁."""
    return bernoulli_drop(delta, density, generator, rescale=rescale)


def _dropped(x: TensorInputs) -> list[torch.Tensor]:
    rescale = bool(x.param("rescale", True))
    return [
        bernoulli_drop(delta, d, x.generator(j), rescale=rescale, inplace=True)
        for j, (delta, d) in enumerate(zip(x.task_vectors(), x.densities))
    ]


@register_method(
    "dare_linear",
    "Linear DARE",
    "https://arxiv.org/abs/2311.03099",
    options=("weights", "density", "lambda", "normalize", "seed"),
    parameters=DARE_PARAMS,
)
def dare_linear(x: TensorInputs) -> Merged:
    return combine_deltas(x, _dropped(x))


@register_method(
    "dare_ties",
    "DARE TIES",
    "https://arxiv.org/abs/2311.03099",
    options=("weights", "density", "lambda", "normalize", "seed"),
    parameters=DARE_PARAMS,
)
def dare_ties(x: TensorInputs) -> Merged:
    return elect_and_merge(x, _dropped(x))
