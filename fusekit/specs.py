"""Strict YAML configs: the pydantic base every user-written file validates against, the model entry
they share, and reading one with every problem reported in one message (recipes, FuseChat and
implicit-fusion configs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_Config = TypeVar("_Config", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe that cannot run, with a message that says what to fix."""


class Strict(BaseModel):
    """Unknown keys are refused (a typo must not fall back to a default silently); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
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



def format_validation_error(path: Path, exc: ValidationError) -> str:
    """Every problem of a config file on its own line, with the key path where it is."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (not part of the schema)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {msg}")
    return f"{path} is not valid:\n  " + "\n  ".join(lines)
