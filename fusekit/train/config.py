"""TrainConfig: the training options with FuseLLM's defaults; from a YAML/TOML file, overridden by flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainConfigError(ValueError):
    """A training configuration that cannot be used, with what to fix."""


class TrainConfig(BaseModel):
    """Defaults are the FuseLLM setup (FUSION-METHOD.md §5), scaled per device by batch size."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    fusion: str = Field("min_ce", description="Fusion rule: min_ce or avg_ce (or any registered rule).")
    granularity: Literal["window", "token"] = "window"
    lam: float = Field(0.9, ge=0.0, le=1.0, description="Weight of CLM; 1.0 = plain continual training.")
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
    fsdp: bool = Field(False, description="Shard the model with torch FSDP under torchrun instead of DDP.")

    # Options that may differ between an interrupted run and its resumption.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({"save_every", "keep_checkpoints", "stop_after", "log_every"})

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree on to be resumed."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.RESUMABLE_CHANGES}


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
    """Defaults < config (object, mapping or YAML/TOML file) < overrides that are not None."""
    if isinstance(config, TrainConfig):
        base = config.model_dump()
    elif isinstance(config, dict):
        base = dict(config)
    elif config is not None:
        base = read_config_file(config)
    else:
        base = {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig.model_validate(base)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise TrainConfigError("invalid training options: " + "; ".join(problems)) from None
    from fusekit.fuse import FUSION_RULES

    if cfg.fusion not in FUSION_RULES:
        raise TrainConfigError(f"unknown fusion rule {cfg.fusion!r}: choose one of {', '.join(sorted(FUSION_RULES))}")
    return cfg
