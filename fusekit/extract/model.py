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
    from fusekit.vocab.normalize import normalize_vocab

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

    from fusekit.model_io import ModelLoadError, _split

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

    from fusekit.model_io import ModelLoadError, load_model

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


def _window_result(logits, ids, k: int, chunk: int) -> WindowResult:
    """Top-k log-probs under the full softmax and the CE of each next token, for one window.

    logits: [n, V] (any float dtype) of the window's positions; ids: int64 [n] its tokens (same device).
    Works through `chunk` positions at a time, so fp32 copies stay small whatever the vocabulary.
    """
    import torch

    n = ids.shape[0]
    topv, topi, ce = [], [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lf = logits[s:e].float()
        lse = torch.logsumexp(lf, dim=-1)
        v, j = torch.topk(lf, k, dim=-1)
        topv.append(v - lse[:, None])
        topi.append(j)
        nxt = ids[s + 1 : e + 1]
        ce.append(lse[: len(nxt)] - lf[: len(nxt)].gather(1, nxt[:, None])[:, 0])
    ce_all = torch.cat(ce + [torch.full((1,), float("nan"), device=logits.device)])
    return WindowResult(
        topk_ids=torch.cat(topi).to(torch.int32).cpu().numpy(),
        topk_logp=torch.cat(topv).cpu().numpy().astype(np.float32),
        ce=ce_all.cpu().numpy().astype(np.float32),
    )


def _logits(net, ids, vocab_size: int, **kwargs):
    logits = net(input_ids=ids, use_cache=False, **kwargs).logits
    if logits.shape[-1] != vocab_size:
        raise ExtractError(f"the model produced {logits.shape[-1]} logits per position, its config says {vocab_size}")
    return logits


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
        ids = ids.to(device)
        logits = _logits(net, ids, vocab_size, attention_mask=attn.to(device))
        chunk = max(1, _LOGIT_CHUNK // vocab_size)
        return [_window_result(logits[i, :n], ids[i, :n], k, chunk) for i, n in enumerate(lengths)]


def pack_windows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of window indices whose lengths sum to at most `capacity`.

    Longest windows first, each into the first row with room (ties by index), so rows are nearly full
    and the result is a pure function of the lengths. A window longer than `capacity` gets a row alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def packed_rows(windows: Sequence[np.ndarray], rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of concatenated windows → (input_ids, position_ids), int64 [len(rows), width].

    Each window's positions restart at 0, which transformers reads as a packed-sequence boundary
    (block-diagonal causal attention), as the trainer's `collate` does; the right padding is one more
    segment whose logits are ignored.
    """
    width = max(sum(len(windows[i]) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(windows[i])
            ids[r, at : at + n] = windows[i]
            pos[r, at : at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(width - at)
    return ids, pos


def forward_topk_packed(net, windows: Sequence[np.ndarray], rows: Sequence[Sequence[int]], k: int, vocab_size: int) -> dict[int, WindowResult]:
    """One forward pass over `rows` of packed windows (see `packed_rows`); window index → its result.

    The same values as one window at a time (up to float rounding): attention stays inside each window.
    Only valid for models where `packing_supported(net)`.
    """
    import torch

    device = next(net.parameters()).device
    ids_np, pos_np = packed_rows(windows, rows)
    out: dict[int, WindowResult] = {}
    with torch.inference_mode():
        ids = torch.as_tensor(ids_np, device=device)
        logits = _logits(net, ids, vocab_size, position_ids=torch.as_tensor(pos_np, device=device))
        chunk = max(1, _LOGIT_CHUNK // vocab_size)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(windows[i])
                out[i] = _window_result(logits[r, at : at + n], ids[r, at : at + n], k, chunk)
                at += n
    return out


def packing_supported(net, vocab_size: int) -> bool:
    """Does this model keep attention inside packed windows (position ids restarting at 0)?

    Checked once per model on two short windows: their packed logits must equal their separate ones
    (to 1e-4 of the logits' scale in fp32, 2e-2 in half precision). Models whose attention ignores the
    boundaries (remote code, old architectures) fail it, and extraction falls back to padded batches.
    """
    import torch

    cached = getattr(net, "_fusekit_packing", None)
    if cached is not None:
        return cached
    device = next(net.parameters()).device
    gen = np.random.default_rng(0)
    a, b = gen.integers(0, vocab_size, 12), gen.integers(0, vocab_size, 7)
    try:
        with torch.inference_mode():
            ids, pos = packed_rows([a, b], [[0, 1]])
            packed = _logits(net, torch.as_tensor(ids, device=device), vocab_size, position_ids=torch.as_tensor(pos, device=device))[0].float()
            alone = [_logits(net, torch.as_tensor(w, device=device)[None], vocab_size)[0].float() for w in (a, b)]
        ref = torch.cat(alone)
        half = next(net.parameters()).dtype in (torch.float16, torch.bfloat16)
        tol = (2e-2 if half else 1e-4) * max(1.0, float(ref.abs().max()))
        ok = bool((packed[: len(a) + len(b)] - ref).abs().max() <= tol)
    except (RuntimeError, TypeError, ValueError):  # a model that does not take position_ids this way
        ok = False
    try:
        net._fusekit_packing = ok
    except AttributeError:
        pass
    return ok
