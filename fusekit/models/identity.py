"""What a model and its tokenizer are, as fingerprints and sizes that stores record and check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fusekit.models.load import ModelLoadError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_name(model: str | Path) -> str:
    """How the store names a model: a folder's or file's name, or the hub id."""
    p = Path(model).expanduser()
    return p.name if p.exists() else str(model)


# Config keys that say where or with what a model was loaded, not what it is.
_CONFIG_NOISE = ("_name_or_path", "transformers_version")


def config_identity(config) -> str:
    """The config as canonical JSON, without the keys that change when a model folder moves."""
    values = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in _CONFIG_NOISE}
    return json.dumps(values, sort_keys=True)


def model_fingerprint(model: str | Path, config_json: str) -> str:
    """sha256 of the config and, for local weights, each weight file's name, size, first and last MiB.

    Cheap on a 100 GB checkpoint and still tells a fine-tune from its base (their tensors differ).
    """
    h = hashlib.sha256(b"fusekit-model/1\n" + config_json.encode("utf-8"))
    p = Path(model).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix in _WEIGHT_SUFFIXES) if p.is_dir() else []
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    if not files:
        h.update(f"hub:{model}".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the fast tokenizer's canonical JSON (vocabulary, merges, normaliser, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"{type(tokenizer).__name__} is a slow tokenizer; extraction needs a fast one (character offsets, "
            "the normalised vocabulary). Install `tokenizers` / save the model with a tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def model_context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def logit_size(config) -> int:
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        text = getattr(config, "text_config", None)
        size = getattr(text, "vocab_size", None) if text is not None else None
    if not isinstance(size, int) or size < 1:
        raise ModelLoadError("the model config has no vocab_size; cannot tell how many logits the model produces")
    return size
