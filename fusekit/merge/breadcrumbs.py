"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): per task vector, drop the largest
γ·n magnitudes (outliers) and the smallest, keeping ⌊density·n⌋; then task arithmetic (breadcrumbs) or
TIES' sign election (breadcrumbs_ties). mergekit's defaults: γ (`gamma`, per model) 0.01, no rescale,
no normalisation. Deterministic (no random masks); see sparsify.magnitude_band for the one difference
from mergekit (tensors with γ·n < 1).
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.sparsify import magnitude_band
from fusekit.merge.task_arithmetic import combine_deltas
from fusekit.merge.ties import elect_and_merge

OPTIONS = ("weights", "density", "lambda", "normalize")
PARAMS = {"rescale": False, "int8_mask": False}
MODEL_PARAMS = {"gamma": 0.01}


def _banded(x: TensorInputs) -> list[torch.Tensor]:
    rescale = bool(x.param("rescale", False))
    return [
        magnitude_band(delta, d, float(x.model_param(j, "gamma", 0.01)), rescale=rescale, inplace=True)
        for j, (delta, d) in enumerate(zip(x.task_vectors(), x.densities))
    ]


@register_method(
    "breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795", options=OPTIONS,
    parameters=PARAMS, model_parameters=MODEL_PARAMS,
)  # fmt: skip
def breadcrumbs(x: TensorInputs) -> Merged:
    return combine_deltas(x, _banded(x))


@register_method(
    "breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795", options=OPTIONS,
    parameters=PARAMS, model_parameters=MODEL_PARAMS,
)  # fmt: skip
def breadcrumbs_ties(x: TensorInputs) -> Merged:
    return elect_and_merge(x, _banded(x))
