"""Where and in what precision a model runs, and loading it there for inference."""

from __future__ import annotations

from pathlib import Path

from fusekit.models.load import ModelLoadError, load_model

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}


class DeviceError(ModelLoadError):
    """A device or dtype that cannot be used here (a typo, or CUDA asked for without a GPU)."""


def resolve_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible (use --device cpu)")
    return dev


def resolve_dtype(dtype: str | None, device) -> str:
    """Canonical dtype name; default fp32 on CPU, bf16 on a GPU that supports it."""
    import torch

    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float16" if device.type == "cuda" else "float32"
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise DeviceError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32")
    return name


def load_net(model: str | Path, dtype: str, device, trust_remote_code: bool):
    import torch

    try:
        net = load_model(model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load {model} as a causal LM: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval()
