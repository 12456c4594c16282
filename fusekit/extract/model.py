"""The model side of extraction: the vocabulary the store keeps, and the top-k of every window's positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusekit.extract.errors import ExtractError
from fusekit.models.packing import model_logits, packed_rows
from fusekit.store.extract_format import pad_token

_LOGIT_CHUNK = 1 << 24  # floats of fp32 logits handled at once (64 MB), whatever the vocabulary


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
        logits = model_logits(net, ids, vocab_size, attention_mask=attn.to(device))
        chunk = max(1, _LOGIT_CHUNK // vocab_size)
        return [_window_result(logits[i, :n], ids[i, :n], k, chunk) for i, n in enumerate(lengths)]


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
        logits = model_logits(net, ids, vocab_size, position_ids=torch.as_tensor(pos_np, device=device))
        chunk = max(1, _LOGIT_CHUNK // vocab_size)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(windows[i])
                out[i] = _window_result(logits[r, at : at + n], ids[r, at : at + n], k, chunk)
                at += n
    return out


