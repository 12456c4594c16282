"""MergeConfig: a merge described in YAML, validated; mergekit's spelling of the same fields is accepted.

    method: varm                 # or merge_method:
    base: runs/pivot             # or base_model:
    models:
      - runs/fused_1             # a path, or a mapping:
      - model: runs/fused_2
        weight: 0.5              # or parameters: {weight: 0.5, density: 0.3}
    parameters: {t: 0.5, lambda: 1.0, normalize: true, density: 0.3, weight: 1.0}
    seed: 0
    dtype: bfloat16
    out: runs/merged
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fusekit.merge.errors import MergeError


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    weight: float | None = None
    density: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if isinstance(data, (str, Path)):
            return {"model": str(data)}
        if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
            data = {**data}
            data.update(data.pop("parameters"))
        return data


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str | None = Field(None, validation_alias=AliasChoices("method", "merge_method"))
    base: str | None = Field(None, validation_alias=AliasChoices("base", "base_model"))
    models: list[ModelEntry] = Field(default_factory=list)
    weight: float | None = Field(None, description="Default weight of every model.")
    density: float | None = Field(None, gt=0, le=1, description="Default density of every model.")
    t: float | None = Field(None, ge=0, le=1)
    lam: float | None = Field(None, validation_alias=AliasChoices("lam", "lambda"))
    normalize: bool | None = None
    seed: int = 0
    dtype: str | None = None
    max_shard_size: int | str = "5GB"
    out: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
            data = {**data}
            params = data.pop("parameters")
            clash = sorted(set(params) & set(data))
            if clash:
                raise ValueError(f"{clash[0]!r} is given both at the top level and under parameters")
            data.update(params)
        return data

    def weights(self) -> list[float] | None:
        if all(m.weight is None for m in self.models) and self.weight is None:
            return None
        return [m.weight if m.weight is not None else (self.weight if self.weight is not None else 1.0) for m in self.models]

    def densities(self) -> list[float] | None:
        if all(m.density is None for m in self.models) and self.density is None:
            return None
        missing = [m.model for m in self.models if m.density is None and self.density is None]
        if missing:
            raise MergeError(f"merge config: model {missing[0]} has no density and there is no default density")
        return [m.density if m.density is not None else self.density for m in self.models]  # type: ignore[misc]


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MergeError(f"cannot read merge config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MergeError(f"merge config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"merge config {path} must be a mapping (method:, base:, models:, …)")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise MergeError(f"merge config {path}: {where}: {first['msg']} ({len(exc.errors())} problem(s))") from None
