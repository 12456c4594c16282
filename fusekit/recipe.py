"""The recipe: one YAML file that describes a whole fusion job (models, corpus, eval sets, stages).

Validated with pydantic: unknown keys are rejected (a typo must not silently fall back to a default)
and every model must exist where the recipe says, before any stage spends compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fusekit.specs import ModelSpec, RecipeError, Strict, format_validation_error, read_config


class DataSpec(Strict):
    name: str
    data: str = Field(description="Text file, folder of text files, JSONL or Parquet.")
    field: str = "text"


class EvalSpec(Strict):
    """A recipe's `eval:`: held-out data for mean CE / perplexity, and lm-evaluation-harness tasks.

    The older form, a list of datasets (`eval: [{name, data}]`), is the `data` of this one.
    """

    data: list[DataSpec] = Field(default_factory=list, description="Held-out sets: mean CE / perplexity per model.")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task, group or tag names (pip install 'fusekit[eval]').")
    include_path: list[str] = Field(default_factory=list, description="Folders of local task YAMLs (relative to the recipe).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (default: each task's own).")
    limit: float | None = Field(None, gt=0, description="Examples per task (below 1: a share).")
    batch_size: int = Field(8, ge=1, description="lm-eval requests per forward pass.")
    chat_template: bool = Field(False, description="Wrap task prompts in the tokenizer's chat template.")

    @model_validator(mode="before")
    @classmethod
    def _list_is_data(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {"data": value}
        if isinstance(value, dict) and isinstance(value.get("tasks"), str):
            return {**value, "tasks": [t.strip() for t in value["tasks"].split(",") if t.strip()]}
        return value

    def __bool__(self) -> bool:
        return bool(self.data or self.tasks)

    def task_options(self):
        """The harness's TaskOptions (None without tasks)."""
        if not self.tasks:
            return None
        from fusekit.eval.harness import TaskOptions

        limit = int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit
        return TaskOptions(
            tasks=tuple(self.tasks), include_path=tuple(self.include_path), num_fewshot=self.num_fewshot, limit=limit,
            batch_size=self.batch_size, apply_chat_template=self.chat_template,
        )


class ExtractOptions(Strict):
    top_k: int = Field(10, ge=1, le=256)
    max_length: int = Field(2048, ge=8)
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] | None = Field(None, description="Default: cuda when available.")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Default: bf16 on cuda, fp32 on cpu.")
    append_eos: bool = Field(True, description="End every plain text with the end-of-sequence token (FuseLLM's reference).")
    prepare: bool = Field(
        False, description="Cut long texts once into pieces of max_length tokens under every model (fusekit prepare) before extracting."
    )


class AlignOptions(Strict):
    workers: int | None = Field(None, ge=1)
    method: Literal["bytespan", "fusellm", "fusechat"] = Field(
        "bytespan", description="bytespan: chain-rule transfer on byte spans (every position); fusellm: the paper's 1:1 carry; "
        "fusechat: the 1:1 carry through FuseChat's statistical vocabulary map (counted over the corpus)."
    )


LossName = Literal["ce", "kl", "reverse_kl", "jsd", "uld", "gold"]


def _check_loss_options(loss: str | None, jsd_beta: float | None) -> None:
    """Training's own check of a loss/jsd_beta pair, as a ValueError for pydantic (before any stage runs)."""
    if loss is None and jsd_beta is None:
        return
    from fusekit.train.config import TrainConfigError, build_config

    try:
        build_config(loss=loss, jsd_beta=jsd_beta)
    except TrainConfigError as exc:
        raise ValueError(str(exc).removeprefix("invalid training options: ")) from None


class TrainVariant(Strict):
    name: str
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    granularity: Literal["window", "token"] = "window"
    lam: float = Field(0.9, ge=0.0, le=1.0)
    loss: LossName | None = Field(None, description="This variant's fusion term (default: train.loss, else ce).")
    jsd_beta: float | None = Field(None, description="This variant's β for jsd/gold (default: train.jsd_beta).")

    @model_validator(mode="after")
    def _loss_options_fit(self) -> "TrainVariant":
        _check_loss_options(self.loss, self.jsd_beta)
        return self


class TrainOptions(Strict):
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
    loss: LossName | None = Field(
        None, description="The fusion term for every variant (default ce, FuseLLM's); fusekit train --loss."
    )
    jsd_beta: float | None = Field(None, description="β of jsd (required) and gold, in (0, 1); fusekit train --jsd-beta.")
    loss_on: Literal["all", "assistant"] | None = None
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute each transformer block's activations in backward (less memory, same numbers)."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Log every step to these trackers (pip install 'fusekit[track]')."
    )

    def resolved(self, name: str) -> Any:
        """An option's value: as set here, else the preset's (FuseLLM's when no preset is named)."""
        value = getattr(self, name)
        if value is not None:
            return value
        from fusekit.train.config import PRESETS, TrainConfig

        return PRESETS[self.preset or "fusellm"].get(name, TrainConfig.model_fields[name].default)

    @model_validator(mode="after")
    def _loss_options_fit(self) -> "TrainOptions":
        """A bad loss/jsd_beta pair stops the recipe before any stage runs, with training's own sentence."""
        _check_loss_options(self.loss, self.jsd_beta)
        return self

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[TrainVariant]) -> list[TrainVariant]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"train variant names must be unique, got {names}")
        return v


class JobSpec(Strict):
    """What every fusion job names: where it writes, its sources, its data and the shared stage options."""

    workdir: str = Field(description="Where every stage writes (resumable: re-running skips what is done).")
    sources: list[ModelSpec] = Field(min_length=1)
    corpus: DataSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
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
            from fusekit.models.load import model_ref_problem

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

        def folder(value: str) -> str:
            local = Path(path_of(value))
            if not local.is_dir():
                problems.append(f"eval.include_path: {value} is not a folder (looked at {local})")
            return str(local)

        evaluation = self.eval.model_copy(
            update={"data": [data(e) for e in self.eval.data], "include_path": [folder(p) for p in self.eval.include_path]}
        )
        resolved = self.model_copy(
            update={
                "workdir": path_of(self.workdir),
                "target": model(self.target),
                "sources": [model(s) for s in self.sources],
                "corpus": data(self.corpus),
                "eval": evaluation,
            }
        )
        if problems:
            raise RecipeError("recipe cannot run:\n  " + "\n  ".join(problems))
        return resolved


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe file; every problem is reported in one RecipeError."""
    return read_config(path, Recipe, "recipe").resolve(Path(path).parent)


__all__ = [
    "AlignOptions", "DataSpec", "EvalSpec", "ExtractOptions", "JobSpec", "ModelSpec", "Recipe", "RecipeError", "TrainOptions",
    "TrainVariant", "format_validation_error", "load_recipe", "read_config",
]
