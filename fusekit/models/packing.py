"""Packing several windows into one row (position ids restarting at 0 mark the boundaries), and the
check that a model keeps attention inside each packed window. Extraction and training both pack."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fusekit.models.load import ModelLoadError


def model_logits(net, ids, vocab_size: int, **kwargs):
    """The model's logits [B, n, V] for `ids`; refuses a model whose logit count differs from its config."""
    logits = net(input_ids=ids, use_cache=False, **kwargs).logits
    check_logit_count(logits.shape[-1], vocab_size)
    return logits


def check_logit_count(count: int, vocab_size: int) -> None:
    """ModelLoadError when a model makes `count` logits per position where its config says `vocab_size`."""
    if count != vocab_size:
        raise ModelLoadError(f"the model produced {count} logits per position, its config says {vocab_size}")


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
        # no_grad, not inference_mode: a sharded (FSDP2) model gathers its weights into buffers it reuses in training.
        with torch.no_grad():
            ids, pos = packed_rows([a, b], [[0, 1]])
            packed = model_logits(net, torch.as_tensor(ids, device=device), vocab_size, position_ids=torch.as_tensor(pos, device=device))[0]
            alone = [model_logits(net, torch.as_tensor(w, device=device)[None], vocab_size)[0].float() for w in (a, b)]
        ref = torch.cat(alone)
        # The precision the logits were computed in (half weights, or a mixed-precision policy's compute dtype).
        half = packed.dtype in (torch.float16, torch.bfloat16)
        packed = packed.float()
        tol = (2e-2 if half else 1e-4) * max(1.0, float(ref.abs().max()))
        ok = bool((packed[: len(a) + len(b)] - ref).abs().max() <= tol)
    except (RuntimeError, TypeError, ValueError):  # a model that does not take position_ids this way
        ok = False
    try:
        net._fusekit_packing = ok
    except AttributeError:
        pass
    return ok
