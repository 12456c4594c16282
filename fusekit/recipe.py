"""The recipe: one YAML file that describes a whole fusion job (models, corpus, eval sets, stages).

Validated with pydantic: unknown keys are rejected (a typo must not silently fall back to a default)
and every model must exist where the recipe says, before any stage spends compute.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


_Config = TypeVar("_Config", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe that cannot run, with a message that says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)




class ModelSpec(_Strict):
    name: str = Field(description="Short name used in tables and folder names.")
    model: str = Field(description="A local model folder, a .gguf file, or a Hugging Face id.")
    align_method: Literal["bytespan", "fusellm", "fusechat"] | None = Field(
        None, description="How this source's distributions reach the target's tokens (default: align.method)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[\w.-]+", v):
            raise ValueError(f"model name {v!r} may only use letters, digits, '_', '-' and '.'")
        return v


class DataSpec(_Strict):
    name: str
    data: str = Field(description="Text file, folder of text files, JSONL or Parquet.")
    field: str = "text"


class ExtractOptions(_Strict):
    top_k: int = Field(10, ge=1, le=256)
    max_length: int = Field(2048, ge=8)
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] | None = Field(None, description="Default: cuda when available.")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Default: bf16 on cuda, fp32 on cpu.")
    append_eos: bool = Field(True, description="End every plain text with the end-of-sequence token (FuseLLM's reference).")
    prepare: bool = Field(
        False, description="Cut long texts once into pieces of max_length tokens under every model (fusekit prepare) before extracting."
    )


class AlignOptions(_Strict):
    workers: int | None = Field(None, ge=1)
    method: Literal["bytespan", "fusellm", "fusechat"] = Field(
        "bytespan", description="bytespan: chain-rule transfer on byte spans (every position); fusellm: the paper's 1:1 carry; "
        "fusechat: the 1:1 carry through FuseChat's statistical vocabulary map (counted over the corpus)."
    )


class TrainVariant(_Strict):
    name: str
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    granularity: Literal["window", "token"] = "window"
    lam: float = Field(0.9, ge=0.0, le=1.0)


class TrainOptions(_Strict):
    """A recipe's `train:` block. Options left unset come from `preset` (fusekit.train.config.PRESETS):
    FuseLLM's recipe for recipes, FuseChat's for FuseChat configs."""

    variants: list[TrainVariant] = Field(
        default_factory=lambda: [
            TrainVariant(name="fusellm-mince", fusion="min_ce"),
            TrainVariant(name="fusellm-avgce", fusion="avg_ce"),
            TrainVariant(name="clm-only", lam=1.0),
        ]
    )
    preset: Literal["fusellm", "fusechat"] | None = Field(None, description="The paper's recipe behind unset options.")
    lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=8)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    clip: float = Field(1.0, gt=0)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps per variant.")
    lam_schedule: Literal["constant", "linear", "hard_and_decay"] | None = None
    lam_end: float | None = Field(None, ge=0, le=1)
    teacher_temperature: float | None = Field(None, gt=0)
    loss_on: Literal["all", "assistant"] | None = None

    def resolved(self, name: str) -> Any:
        """An option's value: as set here, else the preset's (FuseLLM's when no preset is named)."""
        value = getattr(self, name)
        if value is not None:
            return value
        from fusekit.train.config import PRESETS, TrainConfig

        return PRESETS[self.preset or "fusellm"].get(name, TrainConfig.model_fields[name].default)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[TrainVariant]) -> list[TrainVariant]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"train variant names must be unique, got {names}")
        return v


class JobSpec(_Strict):
    """What every fusion job names: where it writes, its sources, its data and the shared stage options."""

    workdir: str = Field(description="Where every stage writes (resumable: re-running skips what is done).")
    sources: list[ModelSpec] = Field(min_length=1)
    corpus: DataSpec
    eval: list[DataSpec] = Field(default_factory=list)
    extract: ExtractOptions = ExtractOptions()
    align: AlignOptions = AlignOptions()

    def check_distinct_names(self, role: str, lead: ModelSpec) -> None:
        """Names become folder names and table rows: the lead model's and the sources' must differ."""
        names = [lead.name] + [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"{role} and source names must be distinct, got {names}")


class Recipe(JobSpec):
    target: ModelSpec
    train: TrainOptions = TrainOptions()

    @model_validator(mode="after")
    def _distinct_names(self) -> "Recipe":
        self.check_distinct_names("target", self.target)
        return self

    def resolve(self, base: Path) -> "Recipe":
        """Relative paths are relative to the recipe file; models and data must exist."""

        def path_of(value: str) -> str:
            p = Path(value).expanduser()
            return str(p if p.is_absolute() else (base / p).resolve())

        problems: list[str] = []

        def model(spec: ModelSpec) -> ModelSpec:
            local = Path(path_of(spec.model))
            if local.exists():
                return spec.model_copy(update={"model": str(local)})
            from fusekit.model_io import model_ref_problem

            problem = model_ref_problem(spec.model, base)
            if problem is None:
                return spec  # a hub id that is cached or can be downloaded
            problems.append(f"model {spec.name!r}: {problem}")
            return spec

        def data(spec: DataSpec) -> DataSpec:
            local = Path(path_of(spec.data))
            if not local.exists():
                problems.append(f"data {spec.name!r}: {spec.data} does not exist (looked at {local})")
            return spec.model_copy(update={"data": str(local)})

        resolved = self.model_copy(
            update={
                "workdir": path_of(self.workdir),
                "target": model(self.target),
                "sources": [model(s) for s in self.sources],
                "corpus": data(self.corpus),
                "eval": [data(e) for e in self.eval],
            }
        )
        if problems:
            raise RecipeError("recipe cannot run:\n  " + "\n  ".join(problems))
        return resolved


def read_config(path: str | Path, schema: type[_Config], what: str) -> _Config:
    """A YAML file validated against `schema`; every problem is reported in one RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no {what} at {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping (workdir, sources, corpus, …)")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(path, exc)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe file; every problem is reported in one RecipeError."""
    return read_config(path, Recipe, "recipe").resolve(Path(path).parent)


def format_validation_error(path: Path, exc: ValidationError) -> str:
    """Every problem of a config file on its own line, with the key path where it is."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (not part of the schema)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {msg}")
    return f"{path} is not valid:\n  " + "\n  ".join(lines)
