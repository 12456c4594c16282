"""Task arithmetic (Ilharco et al. 2023): θ = θ_base + λ Σ_j w_j (θ_j − θ_base).

With `normalize` the weighted sum of task vectors is divided by Σ_j w_j (mergekit's option).
"""

from fusekit.merge.registry import Merged, TensorInputs, register_method, weighted_sum


def combine_deltas(x: TensorInputs, deltas) -> Merged:
    mixed = weighted_sum(deltas, x.weights)
    total = sum(x.weights)
    if x.normalize and abs(total) >= 1e-8:
        mixed.div_(total)
    return Merged(mixed.mul_(x.lam).add_(x.base))


@register_method(
    "task_arithmetic",
    "Task Arithmetic",
    "https://arxiv.org/abs/2212.04089",
    options=("weights", "lambda", "normalize"),
)
def task_arithmetic(x: TensorInputs) -> Merged:
    return combine_deltas(x, x.task_vectors())
