"""The model side of extraction: loading, the vocabulary the store keeps, and top-k per window."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fusekit.extract.errors import ExtractError
from fusekit.store.extract_store import pad_token

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_LOGIT_CHUNK = 1 << 24  # floats of fp32 logits handled at once (64 MB), whatever the vocabulary


def resolve_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ExtractError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError("--device cuda was asked for but no CUDA GPU is visible (use --device cpu)")
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
        raise ExtractError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32")
    return name


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
        raise ExtractError(
            f"{type(tokenizer).__name__} is a slow tokenizer; extraction needs a fast one (character offsets, "
            "the normalised vocabulary). Install `tokenizers` / save the model with a tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def store_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Normalised strings of ids 0..vocab_size−1; ids the tokenizer lacks get unique placeholders."""
    from fusekit.align import normalize_vocab

    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise ExtractError(
            f"the tokenizer has {n_tok} tokens but the model predicts only {vocab_size}: the tokenizer does not "
            "belong to this model (or tokens were added without resizing the embeddings)"
        )
    vocab = normalize_vocab(tokenizer, size=vocab_size)
    backend = tokenizer.backend_tokenizer
    for i, tok in enumerate(vocab):
        if tok == "" and backend.id_to_token(i) is None:
            vocab[i] = pad_token(i)
    return vocab


def model_context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_config(model: str | Path, trust_remote_code: bool):
    from transformers import AutoConfig

    from fusekit.train.model_io import ModelLoadError, _split

    where, extra = _split(model)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read the model config of {model}: {str(exc).splitlines()[0]}") from None


def logit_size(config) -> int:
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        text = getattr(config, "text_config", None)
        size = getattr(text, "vocab_size", None) if text is not None else None
    if not isinstance(size, int) or size < 1:
        raise ExtractError("the model config has no vocab_size; cannot tell how many logits the model produces")
    return size


def load_net(model: str | Path, dtype: str, device, trust_remote_code: bool):
    import torch

    from fusekit.train.model_io import ModelLoadError, load_model

    try:
        net = load_model(model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load {model} as a causal LM: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval()


@dataclass
class WindowResult:
    topk_ids: np.ndarray  # int32 [n, k]
    topk_logp: np.ndarray  # float32 [n, k]
    ce: np.ndarray  # float32 [n], NaN at the last position


def forward_topk(net, windows: Sequence[np.ndarray], k: int, vocab_size: int, pad_id: int = 0) -> list[WindowResult]:
    """One padded forward pass over `windows` (token id arrays); per window the top-k under the full
    softmax and the CE of each next token. Padding sits on the right, so real positions are unaffected."""
    import torch

    device = next(net.parameters()).device
    lengths = [len(w) for w in windows]
    width = max(lengths)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.as_tensor(w)
        attn[i, : len(w)] = 1
    with torch.inference_mode():
        logits = net(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        if logits.shape[-1] != vocab_size:
            raise ExtractError(f"the model produced {logits.shape[-1]} logits per position, its config says {vocab_size}")
        out = []
        ids_dev = ids.to(device)
        chunk = max(1, _LOGIT_CHUNK // vocab_size)
        for i, n in enumerate(lengths):
            topv, topi, ce = [], [], []
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                lf = logits[i, s:e].float()
                lse = torch.logsumexp(lf, dim=-1)
                v, j = torch.topk(lf, k, dim=-1)
                topv.append(v - lse[:, None])
                topi.append(j)
                nxt = ids_dev[i, s + 1 : e + 1] if e < n else ids_dev[i, s + 1 : n]
                c = lse[: len(nxt)] - lf[: len(nxt)].gather(1, nxt[:, None])[:, 0]
                ce.append(c)
            ce_all = torch.cat(ce + [torch.full((1,), float("nan"), device=device)])
            out.append(
                WindowResult(
                    topk_ids=torch.cat(topi).to(torch.int32).cpu().numpy(),
                    topk_logp=torch.cat(topv).cpu().numpy().astype(np.float32),
                    ce=ce_all.cpu().numpy().astype(np.float32),
                )
            )
    return out
