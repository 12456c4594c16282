"""Loading the model to train or evaluate: an HF folder, a `.gguf` file, or a hub id."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with where fusekit looked."""


@contextmanager
def quiet_transformers():
    """No per-file "Loading weights" / "Writing model shards" bars inside fusekit's own progress."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _split(model: str | Path) -> tuple[str, dict]:
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"no GGUF file at {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a model folder (no config.json); give a saved model folder or a .gguf")
        return str(p), {}
    if str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ModelLoadError(f"no model at {p}")
    return str(model), {}  # a hub id


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where, extra = _split(model)
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {model}: {exc}") from None


def load_model(model: str | Path, dtype=None, trust_remote_code: bool = False):
    """A causal LM in `dtype` (fp32 by default: the master weights), ready for `save_pretrained`.

    A GGUF-loaded model refuses `save_pretrained`, so its (dequantised) weights are moved into a model
    built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    where, extra = _split(model)
    try:
        with quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a model from {model}: {exc}") from None
    if "gguf_file" not in extra:
        return loaded
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    plain.load_state_dict(loaded.state_dict())
    return plain
