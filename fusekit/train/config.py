"""TrainConfig: the training options with FuseLLM's defaults; from a YAML/TOML file, overridden by flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fusekit.train.loss_names import BETA_LOSSES, GOLD_DEFAULT_BETA, LOSSES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainConfigError(ValueError):
    """A training configuration that cannot be used, with what to fix."""


PRESETS: dict[str, dict[str, Any]] = {
    # FuseLLM (arXiv 2401.10491 §4.1): λ 0.9, lr 1e-5, 1 epoch, AdamW(0.9, 0.95), wd 0.1, 0.8 % warm-up.
    "fusellm": dict(lam=0.9, lr=1e-5, epochs=1.0, weight_decay=0.1, warmup_ratio=0.008, betas=(0.9, 0.95),
                    loss_on="all"),
    # FuseChat (arXiv 2402.16107 §4.1): lr 5e-6, 3 epochs, no weight decay, 3 % warm-up, HF's default
    # AdamW β2 0.999; loss on assistant tokens only.
    "fusechat": dict(lam=0.9, lr=5e-6, epochs=3.0, weight_decay=0.0, warmup_ratio=0.03, betas=(0.9, 0.999),
                     loss_on="assistant"),
}


class TrainConfig(BaseModel):
    """Defaults are the FuseLLM setup (FUSION-METHOD.md §5), scaled per device by batch size.

    `preset` names the paper whose recipe fills every option the user leaves unset (`PRESETS`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: Literal["fusellm", "fusechat"] = Field("fusellm", description="The paper's recipe behind the defaults.")

    fusion: str = Field("min_ce", description="Fusion rule: min_ce or avg_ce (or any registered rule).")
    granularity: Literal["window", "token"] = "window"
    loss: Literal["ce", "kl", "reverse_kl", "jsd", "uld", "gold"] = Field(
        "ce",
        description="The fusion term: ce (FuseLLM's CE to the fused distribution), kl, reverse_kl, jsd (GKD's "
        "generalized JSD, needs jsd_beta), uld (sorted-probability L1, Boizard et al.) or gold (TRL GOLD's JSD + ULD "
        "hybrid); fusekit/train/divergence.py.",
    )
    jsd_beta: float | None = Field(
        None, description="β of jsd (required) and gold (default 0.5), in (0, 1): M = β·p + (1−β)·q, TRL's convention."
    )
    lam: float = Field(0.9, ge=0.0, le=1.0, description="Weight of CLM; 1.0 = plain continual training.")
    lam_schedule: Literal["constant", "linear", "hard_and_decay"] = Field(
        "constant",
        description="λ over the run: constant; linear from lam to lam_end; hard_and_decay = FuseAI's rule "
        "λ_t = λ + (1 − λ)·t/T (to 1, i.e. the fusion weight decays to 0).",
    )
    lam_end: float = Field(1.0, ge=0.0, le=1.0, description="λ at the last step of a linear schedule.")
    teacher_temperature: float = Field(
        1.0, gt=0, description="Fused target p ∝ p^(1/T) over its ids, mass kept (FuseAI's distill_teacher_temperature)."
    )
    loss_on: Literal["all", "assistant"] = Field(
        "all", description="assistant: every window must carry a loss_mask (chat data), else training stops."
    )
    fused_head: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Chunked output layer + loss without [N, V] logits: auto falls back to the logits path "
        "(with a warning) for models whose head is not a plain linear layer; on refuses them.",
    )
    lr: float = Field(1e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="Packed rows per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=2, description="Row length after packing windows.")
    warmup_ratio: float = Field(0.008, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 turns clipping off.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    seed: int = 0
    shuffle: bool = True
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps (the schedule spans them).")
    stop_after: int | None = Field(
        None, ge=1, description="Checkpoint and stop after this many steps in this invocation (schedule unchanged)."
    )
    log_every: int = Field(1, ge=1)
    fsdp: bool = Field(
        False,
        description="Shard the model with FSDP2 (fully_shard per block) under torchrun instead of DDP; built on the "
        "meta device, rank 0 reads the weights and broadcasts each rank its shards.",
    )
    fsdp_offload: bool = Field(
        False, description="With fsdp: keep the shards, gradients and optimizer state in host memory (CPUOffloadPolicy)."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Activation checkpointing per transformer block (non-reentrant): each block's activations are "
        "recomputed in backward; less memory, one more forward per step, the same numbers.",
    )
    loader_workers: int | None = Field(
        None, ge=0, description="Processes per rank that decode and fuse the aligned store ahead of training; "
        "None: up to 4 by the cores per rank, 0 on a store of a few row groups; 0: in the trainer's reading thread.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Also log every step's metrics and the config to these trackers (rank 0; tracking.py)."
    )

    # Options that may differ between an interrupted run and its resumption: bookkeeping, and how the same
    # maths is laid out (the number of ranks may change too, with grad_accum keeping the rows of a step).
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"save_every", "keep_checkpoints", "stop_after", "log_every", "fused_head", "fsdp", "fsdp_offload",
         "gradient_checkpointing", "grad_accum", "loader_workers", "report_to"}
    )

    @model_validator(mode="after")
    def _beta_fits_the_loss(self) -> "TrainConfig":
        if self.jsd_beta is not None:
            if self.loss not in BETA_LOSSES:
                raise ValueError(f"jsd_beta applies to the jsd and gold losses only, not to loss {self.loss}")
            if not 0.0 < self.jsd_beta < 1.0:
                raise ValueError(f"jsd_beta must lie strictly between 0 and 1, got {self.jsd_beta}")
        elif self.loss == "jsd":
            raise ValueError("loss jsd needs jsd_beta in (0, 1) (e.g. --jsd-beta 0.5; TRL's convention: "
                             "M = β·p_teacher + (1−β)·q_student)")
        return self

    @property
    def loss_beta(self) -> float | None:
        """The β the loss uses: jsd_beta, or GOLD's default 0.5 for gold without one; None for the others."""
        if self.loss not in BETA_LOSSES:
            return None
        return self.jsd_beta if self.jsd_beta is not None else GOLD_DEFAULT_BETA

    def lam_at(self, step: int, total_steps: int) -> float:
        """λ for optimizer step `step` (0-based) of `total_steps`."""
        if self.lam_schedule == "constant":
            return self.lam
        end = 1.0 if self.lam_schedule == "hard_and_decay" else self.lam_end
        return self.lam + (end - self.lam) * step / max(1, total_steps)

    @property
    def uses_target(self) -> bool:
        """Whether any step weighs the fusion term (then the fused targets are read)."""
        if self.lam_schedule == "constant":
            return self.lam < 1.0
        return min(self.lam, 1.0 if self.lam_schedule == "hard_and_decay" else self.lam_end) < 1.0

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree on to be resumed.

        `loss` and `jsd_beta` appear only when not their defaults: checkpoints written before the options
        existed trained with FuseLLM's CE and must still compare equal.
        """
        out = {k: v for k, v in self.model_dump(mode="json").items() if k not in self.RESUMABLE_CHANGES}
        for name, default in (("loss", "ce"), ("jsd_beta", None)):
            if out.get(name) == default:
                out.pop(name)
        return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"no config file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise TrainConfigError(f"{path} cannot be parsed: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path} must hold a mapping of training options (lr, lam, …)")
    # A recipe-style file may nest the options under `train:`.
    return raw.get("train", raw) if set(raw) == {"train"} else raw


def build_config(
    config: TrainConfig | str | Path | dict[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """Defaults < the preset's recipe < config (object, mapping or YAML/TOML file) < overrides that are not None.

    The preset is the one named by the overrides, else by the config, else FuseLLM's.
    """
    if isinstance(config, TrainConfig):
        given = config.model_dump()
    elif isinstance(config, dict):
        given = dict(config)
    elif config is not None:
        given = read_config_file(config)
    else:
        given = {}
    given.update({k: v for k, v in overrides.items() if v is not None})
    loss = given.get("loss", "ce")
    if loss not in LOSSES:
        raise TrainConfigError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    preset = given.get("preset", "fusellm")
    if preset not in PRESETS:
        raise TrainConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    base = {**PRESETS[preset], **given}
    try:
        cfg = TrainConfig.model_validate(base)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            if err["type"] == "value_error" and not err["loc"]:  # a check across options: its own sentence
                problems.append(str(err["ctx"]["error"]))
                continue
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise TrainConfigError("invalid training options: " + "; ".join(problems)) from None
    from fusekit.fuse import FUSION_RULES

    if cfg.fusion not in FUSION_RULES:
        raise TrainConfigError(f"unknown fusion rule {cfg.fusion!r}: choose one of {', '.join(sorted(FUSION_RULES))}")
    return cfg
