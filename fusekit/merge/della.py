"""DELLA (Deep et al. 2024, arXiv:2406.11617): MagPrune drops task-vector entries with a probability that
falls with their magnitude rank, then merges with TIES' sign election (della) or linearly (della_linear).

As mergekit: per row, ranks by |δ| ascending give keep probabilities density − ε … density + ε (ε =
`epsilon`, default 0.15, per model); survivors are rescaled to keep ‖δ‖₁ (`rescale`, default on) rather
than the paper's 1/p per entry; della normalises by the agreeing weights by default, della_linear not.
Masks are drawn from the per-(seed, tensor, model) generator, so they cannot match mergekit's bit for bit.
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.sparsify import della_drop
from fusekit.merge.task_arithmetic import combine_deltas
from fusekit.merge.ties import elect_and_merge

OPTIONS = ("weights", "density", "lambda", "normalize", "seed")
PARAMS = {"rescale": True, "int8_mask": False}
MODEL_PARAMS = {"epsilon": 0.15}


def _pruned(x: TensorInputs) -> list[torch.Tensor]:
    rescale = bool(x.param("rescale", True))
    return [
        della_drop(delta, d, float(x.model_param(j, "epsilon", 0.15)), x.generator(j), rescale=rescale, inplace=True)
        for j, (delta, d) in enumerate(zip(x.task_vectors(), x.densities))
    ]


@register_method(
    "della", "DELLA", "https://arxiv.org/abs/2406.11617", options=OPTIONS, default_normalize=True,
    parameters=PARAMS, model_parameters=MODEL_PARAMS,
)  # fmt: skip
def della(x: TensorInputs) -> Merged:
    return elect_and_merge(x, _pruned(x))


@register_method(
    "della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617", options=OPTIONS,
    parameters=PARAMS, model_parameters=MODEL_PARAMS,
)  # fmt: skip
def della_linear(x: TensorInputs) -> Merged:
    return combine_deltas(x, _pruned(x))
