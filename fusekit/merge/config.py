"""MergeConfig: a merge described in YAML, validated — mergekit's configuration as-is, or fusekit's shorter spelling.

    merge_method: ties           # or method:
    base_model: runs/pivot       # or base:
    models:
      - runs/fused_1             # a path, or a mapping:
      - model: runs/fused_2
        parameters:              # per model (fusekit also takes weight:/density: next to model:)
          weight: [0.2, 0.8]     # a gradient over the layers
          density: 0.5
    parameters:                  # for every model / the merge (fusekit also takes them at the top level)
      normalize: true
      t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]
    slices: …                    # mergekit slices that keep layer i at layer i (see to_slices)
    dtype: bfloat16              # output dtype (mergekit: also its working dtype; fusekit computes in fp32)
    out_dtype: bfloat16          # mergekit's output dtype, wins over dtype
    tokenizer_source: base       # base, union or a model: copy that tokenizer (one vocabulary only)
    seed: 0
    max_shard_size: 5GB
    out: runs/merged
Settings (scalars, gradients, filtered lists) are resolved per tensor by fusekit.merge.params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fusekit.merge.errors import MergeError
from fusekit.merge.params import SliceSpec, check_setting

# fusekit's flat spellings of parameters, accepted next to `model:` or at the top level
FLAT_PARAMS = {"weight": "weight", "density": "density", "t": "t", "lam": "lambda", "lambda": "lambda", "normalize": "normalize"}
UNSUPPORTED = {
    "modules": "mergekit's `modules:` (multi-module models) is not supported: use `models:` or `slices:`",
    "tokenizer": "mergekit's `tokenizer:` section (adding tokens, merging vocabularies) is not supported: "
    "use tokenizer_source: base (or a model) with models that share one vocabulary",
    "chat_template": "chat_template is not supported: set it in the tokenizer_config.json of the tokenizer source",
}


def _flatten_params(data: dict, flat: dict[str, str], where: str) -> dict:
    data = dict(data)
    params = data.pop("parameters", None) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}parameters must be a mapping of parameter names to values")
    params = dict(params)
    for key, name in flat.items():
        if key in data:
            if name in params:
                raise ValueError(f"{name!r} is given both at the top level and under parameters")
            params[name] = data.pop(key)
    for name, value in params.items():
        try:
            check_setting(value, f"parameter {name}")
        except MergeError as exc:
            raise ValueError(str(exc)) from None
    data["parameters"] = params
    return data


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if isinstance(data, (str, Path)):
            return {"model": str(data)}
        if isinstance(data, dict):
            return _flatten_params(data, {"weight": "weight", "density": "density"}, "a model's ")
        return data

    def scalar(self, name: str) -> Any:
        value = self.parameters.get(name)
        return value if isinstance(value, (int, float)) else None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        return _flatten_params(data, {}, "a slice source's ") if isinstance(data, dict) else data


class SliceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        return _flatten_params(data, {}, "a slice's ") if isinstance(data, dict) else data


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Optional[str] = Field(None, validation_alias=AliasChoices("method", "merge_method"))
    base: Optional[str] = Field(None, validation_alias=AliasChoices("base", "base_model"))
    models: list[ModelEntry] = Field(default_factory=list)
    slices: Optional[list[SliceEntry]] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    max_shard_size: int | str = "5GB"
    out: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, why in UNSUPPORTED.items():
            if data.get(key) is not None:
                raise ValueError(why)
        data = _flatten_params(data, FLAT_PARAMS, "")
        if "slices" in data and not data["slices"]:
            raise ValueError("slices: is empty: give the slices, or models: instead")
        if data.get("models") and data.get("slices"):
            raise ValueError("give either models: or slices:, not both (as mergekit)")
        return data

    # --- views ---------------------------------------------------------------------------------------

    def model_paths(self) -> list[str]:
        if self.slices:
            return [s.model for s in self.slices[0].sources]
        return [m.model for m in self.models]

    def weights(self) -> list[float] | None:
        """Each model's weight where every one is a plain number (no gradient/filter), else None."""
        return self._scalars("weight")

    def densities(self) -> list[float] | None:
        return self._scalars("density")

    def _scalars(self, name: str) -> list[float] | None:
        if self.slices:
            return None
        top = self.parameters.get(name)
        values = [m.scalar(name) if name in m.parameters else (top if isinstance(top, (int, float)) else None) for m in self.models]
        return None if any(v is None for v in values) else [float(v) for v in values]

    def model_parameters(self) -> list[dict[str, Any]]:
        if self.slices:
            return [{} for _ in self.slices[0].sources]
        return [dict(m.parameters) for m in self.models]

    def slice_specs(self) -> list[SliceSpec] | None:
        """mergekit slices as fusekit runs them: consecutive layer ranges, the same in every source.

        fusekit merges layer i of every model into layer i. Slices that stack, repeat, drop or shift layers
        (frankenmerges, passthrough) are refused with MergeError; so are slice-level base models.
        """
        if not self.slices:
            return None
        names = self.model_paths()
        specs: list[SliceSpec] = []
        end = 0
        for n, sl in enumerate(self.slices):
            where = f"slices[{n}]"
            if sl.base_model not in (None, self.base):
                raise MergeError(f"{where}: a slice-level base_model other than the top-level one is not supported")
            if sl.residual_weight is not None:
                raise MergeError(f"{where}: residual_weight is not supported")
            if [s.model for s in sl.sources] != names and sorted(s.model for s in sl.sources) != sorted(names):
                raise MergeError(f"{where}: every slice must take the same models ({', '.join(names)})")
            ranges = {tuple(s.layer_range) for s in sl.sources}
            if len(ranges) != 1 or next(iter(ranges))[0] != end or next(iter(ranges))[1] <= end:
                raise MergeError(
                    f"{where}: layer_range {sorted(ranges)} — fusekit merges layer i of every model into layer i, "
                    f"so slices must cover the layers in order from 0 (this one should start at {end}) with the "
                    "same range in every source; stacking, repeating or reordering layers (frankenmerges, "
                    "passthrough) needs mergekit"
                )
            start, end = next(iter(ranges))
            by_model = {s.model: s.parameters for s in sl.sources}
            specs.append(SliceSpec(start, end, dict(sl.parameters), [dict(by_model[m]) for m in names]))
        return specs


def validate_config(data: dict, source: str = "merge config") -> MergeConfig:
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise MergeError(f"{source}: {where}: {msg} ({len(exc.errors())} problem(s))") from None


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MergeError(f"cannot read merge config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MergeError(f"merge config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"merge config {path} must be a mapping (merge_method:, base_model:, models:, …)")
    return validate_config(data, f"merge config {path}")
