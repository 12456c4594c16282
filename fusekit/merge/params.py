"""mergekit's parameter settings, resolved per tensor: scalars, gradients over layers and filtered lists.

A setting is what a mergekit YAML may give for one parameter:
    weight: 0.5                               # a scalar (number, bool or string)
    weight: [0, 0.5, 1]                       # a gradient: interpolated over the layers of the slice
    t: [{filter: self_attn, value: [0, 1]},   # a filtered list: the first entry whose filter is a
        {filter: mlp, value: 0.3},            #   substring of the tensor's name (or has no filter,
        {value: 0.5}]                         #   or filter "*") gives the value
Rules as mergekit's `evaluate_setting` and `MergePlanner`: a layer tensor's position is
t = (index within its slice) / (slice length − 1) (t = 1 for a one-layer slice); tensors outside the
layers (embeddings, final norm, head) have t = 0. A filtered list that matches nothing yields no value,
so the lookup falls through: the model's own parameters, then its slice's, then the top-level ones,
then the method's default. Options given explicitly to `merge_models` / the CLI win over all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from fusekit.merge.errors import MergeError

Scalar = Union[float, int, bool, str]
Setting = Any  # Scalar | list[number] | list[{filter, value}]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (`model.layers.3.mlp…` → 3), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def check_setting(setting: Setting, where: str) -> None:
    """Raise MergeError unless `setting` is a scalar, a gradient or a list of {filter?, value} entries."""
    if isinstance(setting, (int, float, bool, str)):
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float, bool, str)) for e in setting):
            return
        if all(isinstance(e, dict) for e in setting):
            for e in setting:
                extra = set(e) - {"filter", "value"}
                if "value" not in e or extra:
                    raise MergeError(f"{where}: each filtered entry takes `filter:` (optional) and `value:`; got {e}")
                if isinstance(e["value"], (dict, list)) and not (
                    isinstance(e["value"], list) and all(isinstance(v, (int, float)) for v in e["value"])
                ):
                    raise MergeError(f"{where}: a filtered entry's value is a scalar or a list of numbers; got {e['value']}")
            return
    raise MergeError(f"{where}: expected a number, a list of numbers (a gradient) or a list of filter/value entries; got {setting!r}")


def evaluate_setting(tensor_name: str, setting: Setting, t: float) -> Scalar | None:
    """The value of a setting for one tensor at position t ∈ [0, 1] (mergekit's `evaluate_setting`).

    A gradient [v_0 … v_{n−1}] gives the linear interpolation at t·(n−1); a list of non-numbers gives
    the entry at ⌊t·(n−1)⌋; a filtered list gives its first matching entry's value (None if none matches).
    """
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (int, float, bool, str)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


@dataclass(frozen=True)
class SliceSpec:
    """Output layers [start, end) taken from the same layers of every model, with their own parameters."""

    start: int
    end: int
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    model_parameters: Sequence[Mapping[str, Setting]] = ()  # one per model, in the models' order


@dataclass(frozen=True)
class ParamSource:
    """Everything a merge's per-tensor parameters come from, in increasing priority of lookup order.

    model_parameters: one mapping per model (its YAML `parameters:`); parameters: the top-level ones;
    slices: layer ranges with their own settings (None: one slice over all layers);
    overrides / model_overrides: explicit options (`merge_models` arguments, CLI flags), which win.
    """

    model_parameters: Sequence[Mapping[str, Setting]]
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    slices: Sequence[SliceSpec] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    model_overrides: Sequence[Mapping[str, Any]] = ()

    def position(self, name: str, num_layers: int) -> tuple[float, SliceSpec | None]:
        """(t, slice) of a tensor: its gradient position and the slice whose settings apply."""
        idx = layer_index(name)
        slices = self.slices
        if idx is None:
            if not slices:
                return 0.0, None
            # mergekit reads pre-layer weights (embeddings) with the first slice, the rest with the last.
            return 0.0, slices[0] if any(p in name for p in _PRE) else slices[-1]
        if not slices:
            return (idx / (num_layers - 1) if num_layers > 1 else 1.0), None
        for s in slices:
            if s.start <= idx < s.end:
                n = s.end - s.start
                return ((idx - s.start) / (n - 1) if n > 1 else 1.0), s
        raise MergeError(f"tensor {name!r} is in layer {idx}, which no slice covers")

    def resolve(
        self, name: str, num_layers: int, global_names: Mapping[str, Any], model_names: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(global values, one dict of per-model values per model) for tensor `name`.

        `global_names` / `model_names` map each parameter the method reads to its default.
        """
        t, sl = self.position(name, num_layers)
        global_scopes = [sl.parameters if sl else {}, self.parameters]
        out_global = {}
        for p, default in global_names.items():
            out_global[p] = self._lookup(p, name, t, [self.overrides], global_scopes, default)
        out_models = []
        for j in range(len(self.model_parameters)):
            own = sl.model_parameters[j] if sl and sl.model_parameters else self.model_parameters[j]
            explicit = [self.model_overrides[j] if self.model_overrides else {}, self.overrides]
            values = {}
            for p, default in model_names.items():
                values[p] = self._lookup(p, name, t, explicit, [own, *global_scopes], default)
            out_models.append(values)
        return out_global, out_models

    @staticmethod
    def _lookup(p: str, name: str, t: float, explicit: list[Mapping], scopes: list[Mapping], default: Any) -> Any:
        for scope in explicit:
            if scope.get(p) is not None:
                return scope[p]
        for scope in scopes:
            if p in scope:
                value = evaluate_setting(name, scope[p], t)
                if value is not None:
                    return value
        return default
