"""Linear average (model soups, Wortsman et al. 2022): θ = Σ_j w_j θ_j / Σ_j w_j (unnormalised: Σ_j w_j θ_j).

The base only supplies config and tokenizer; list it among the models to include its weights.
"""

from fusekit.merge.registry import Merged, TensorInputs, register_method, weighted_sum


@register_method(
    "linear", "Linear", "https://arxiv.org/abs/2203.05482", options=("weights", "normalize"), default_normalize=True,
    needs_base=False,
)
def linear(x: TensorInputs) -> Merged:
    out = weighted_sum(x.models, x.weights)
    if x.normalize:
        out.div_(sum(x.weights))
    return Merged(out)
