"""The implicit-fusion config (FuseChat-3.0): one YAML file, validated before any stage spends compute.

    workdir: runs/imf
    target:  {name: target, model: PATH_OR_ID}
    sources: [{name: a, model: …}, {name: b, model: …}]
    prompts: {data: prompts.jsonl}     # chat `messages` without the final assistant turn; optional `reference`
    eval:    {data: heldout.jsonl}     # same format, optional
    sample:  {n: 4, max_new_tokens: 256, temperature: 0.8, top_p: 0.95, seed: 0, batch_size: 8, backend: auto}
    reward:  {function: numeric}       # exact_match | numeric | "pkg.module:fn"; or {model: PATH}
    build:   {margin: 0.0}
    sft:     {lr: 5e-6, epochs: 1}            # report_to: [tensorboard, wandb, mlflow] (optional)
    dpo:     {beta: 0.1, lr: 5e-7, epochs: 1}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from fusekit.specs import ModelSpec, RecipeError, Strict, read_config


class PromptSpec(Strict):
    data: str = Field(description="JSONL: one {'messages': [...], 'reference': ...} record per line.")


class SampleOptions(Strict):
    n: int = Field(4, ge=1, description="Responses per prompt and source.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.8, ge=0, description="0 = greedy (then n identical answers).")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (each answered n times).")
    device: str | None = Field(None, description="Default: cuda when available (transformers backend).")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM where it is installed and a CUDA GPU is available, else transformers."
    )

    def identity(self, backend: str) -> dict[str, Any]:
        """The options the samples depend on, with the backend that ran (`auto` resolved). The
        transformers backend is left out, so workdirs from before the choice existed stay valid."""
        ident = self.model_dump(exclude={"device", "backend"})
        return ident if backend == "transformers" else {**ident, "backend": backend}


class RewardOptions(Strict):
    function: str | None = Field(None, description="exact_match, numeric, or 'pkg.module:fn' (fn(messages, response, reference) -> float).")
    model: str | None = Field(None, description="A sequence-classification reward model (its own tokenizer and template).")
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "RewardOptions":
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of reward.function and reward.model")
        return self

    def identity(self) -> dict[str, Any]:
        return {"function": self.function, "model": self.model}


class BuildOptions(Strict):
    margin: float = Field(0.0, ge=0, description="A pair needs best − worst reward > margin.")


class SFTOptions(Strict):
    lr: float = Field(5e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8, description="Prompt + response tokens; longer examples keep their start.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, ge=0)
    seed: int = 0
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps: a killed run continues from the last one.")
    fused_head: Literal["auto", "on", "off"] = Field(
        "auto", description="Sequence log-probs from the output layer in chunks (no [B, L, V] logits); auto falls back "
        "to the logits path for a model whose head is not a plain linear layer, on refuses it.",
    )
    fsdp: bool = Field(False, description="Under torchrun: shard the model with FSDP2 instead of DDP.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Log every step to these trackers (pip install 'fusekit[track]'); `--report-to` sets both stages."
    )

    # How the steps are computed, not what they compute: a finished stage is not redone when these change.
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"save_every", "fused_head", "fsdp", "report_to"})

    def identity(self) -> dict[str, Any]:
        """The options the trained model depends on (how often it is checkpointed, on how many devices, or where it is tracked are not)."""
        return self.model_dump(exclude=set(self.NOT_IDENTITY))


class DPOOptions(SFTOptions):
    lr: float = Field(5e-7, gt=0)
    beta: float = Field(0.1, gt=0, description="DPO's β: strength of the KL tie to the reference (the SFT model).")
    objective: Literal["dpo", "wrpo"] = Field(
        "dpo", description="dpo: FuseChat-3.0 pairs; wrpo: WRPO's weighted reward over the sources' best and the SFT model's own best answer."
    )
    alpha: float = Field(0.5, ge=0, le=1, description="WRPO: the fusion coefficient's final value (it rises linearly from 0 over the steps).")


class ImplicitConfig(Strict):
    workdir: str
    target: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    prompts: PromptSpec
    eval: PromptSpec | None = None
    sample: SampleOptions = SampleOptions()
    reward: RewardOptions
    build: BuildOptions = BuildOptions()
    sft: SFTOptions = SFTOptions()
    dpo: DPOOptions = DPOOptions()

    @model_validator(mode="after")
    def _names(self) -> "ImplicitConfig":
        names = [self.target.name] + [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"target and source names must be distinct, got {names}")
        return self

    def resolve(self, base: Path) -> "ImplicitConfig":
        """Relative paths are relative to the config file; local models and data must exist."""
        problems: list[str] = []

        def path_of(value: str) -> Path:
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        def model(value: str, what: str) -> str:
            local = path_of(value)
            if local.exists():
                return str(local)
            from fusekit.models.load import model_ref_problem

            problem = model_ref_problem(value, base)
            if problem is None:
                return value  # a hub id that is cached or can be downloaded
            problems.append(f"{what}: {problem}")
            return value

        def data(spec: PromptSpec | None, what: str) -> PromptSpec | None:
            if spec is None:
                return None
            local = path_of(spec.data)
            if not local.is_file():
                problems.append(f"{what}: {spec.data} does not exist (looked at {local})")
            return spec.model_copy(update={"data": str(local)})

        reward = self.reward
        if reward.model is not None:
            reward = reward.model_copy(update={"model": model(reward.model, "reward.model")})
        resolved = self.model_copy(
            update={
                "workdir": str(path_of(self.workdir)),
                "target": self.target.model_copy(update={"model": model(self.target.model, f"model {self.target.name!r}")}),
                "sources": [s.model_copy(update={"model": model(s.model, f"model {s.name!r}")}) for s in self.sources],
                "prompts": data(self.prompts, "prompts"),
                "eval": data(self.eval, "eval"),
                "reward": reward,
            }
        )
        if problems:
            raise RecipeError("implicit-fusion config cannot run:\n  " + "\n  ".join(problems))
        return resolved


def load_implicit(path: str | Path) -> ImplicitConfig:
    """Read, validate and resolve an implicit-fusion YAML; every problem in one RecipeError."""
    path = Path(path)
    return read_config(path, ImplicitConfig, "implicit-fusion config").resolve(path.parent)
