"""The model side of extraction: the vocabulary the store keeps, and the top-k of every window's positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fusekit._units import size_text
from fusekit.extract.errors import ExtractError
from fusekit.models.head import capture_head_input, head_usable, output_layer
from fusekit.models.packing import check_logit_count, model_logits, packed_rows
from fusekit.store.extract_format import pad_token

# Logits are made and reduced (logsumexp, top-k, CE) a tile at a time: on CPU up to 2,048 positions ×
# 2,048 vocabulary entries (16 MB of fp32), so memory stays bounded whatever the batch and vocabulary and
# the output layer's weight is read once per 2,048 positions; measured 1.0-1.3x the speed of reducing
# the model's whole [B, n, V] logits (benchmarks/bench_extract_head.py). On a GPU, 8,192 × 8,192 tiles
# keep the kernel launches per batch few, for ~0.7-1 GB of transients (not measured: no GPU was at hand).
_TILE_FLOATS = 1 << 22
_TILE_FLOATS_GPU = 1 << 26

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


def tile_shape(positions: int, vocab_size: int, gpu: bool = False) -> tuple[int, int]:
    """(positions, vocabulary entries) of one tile: about `_TILE_FLOATS` logits (`_TILE_FLOATS_GPU` on
    a GPU), square where the vocabulary allows."""
    floats = _TILE_FLOATS_GPU if gpu else _TILE_FLOATS
    cols = min(vocab_size, int(floats**0.5))
    return max(1, min(positions, floats // cols)), cols


Tile = Callable[[int, int, int, int], "torch.Tensor"]  # (rows start, end, vocab start, end) → logits


def topk_and_ce(tile: Tile, n: int, vocab_size: int, next_ids, k: int):
    """Top-k log-probs under the full softmax and the CE of each position's next token, tile by tile.

    tile(r0, r1, v0, v1): logits [r1 − r0, v1 − v0] (any float dtype) of positions r0..r1 over ids v0..v1;
    next_ids: int64 [n], the token after each position (any id where there is none: its CE is then
    meaningless). Returns (ids int64 [n, k], log-probs float32 [n, k], CE float32 [n] in nats).
    The log-partition is accumulated over vocabulary tiles (logaddexp) and the top-k merged across them,
    so values equal one softmax over the whole row up to float rounding. ValueError when k > vocab_size.
    """
    import torch

    if k > vocab_size:
        raise ValueError(f"top-k {k} exceeds the vocabulary ({vocab_size})")
    rows, cols = tile_shape(n, vocab_size, gpu=next_ids.device.type != "cpu")
    ids_out, logp_out, ce_out = [], [], []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        nxt = next_ids[r0:r1]
        lse = top_v = top_i = None
        nxt_logit = torch.zeros(r1 - r0, dtype=torch.float32, device=nxt.device)
        for v0 in range(0, vocab_size, cols):
            v1 = min(vocab_size, v0 + cols)
            lf = tile(r0, r1, v0, v1).float()
            part = torch.logsumexp(lf, dim=-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
            v, j = torch.topk(lf, min(k, v1 - v0), dim=-1)
            if top_v is None:
                top_v, top_i = v, j + v0
            else:
                both = torch.cat([top_v, v], 1)
                top_v, at = torch.topk(both, min(k, both.shape[1]), dim=-1)  # < k while k exceeds the tiles so far
                top_i = torch.cat([top_i, j + v0], 1).gather(1, at)
            here = (nxt >= v0) & (nxt < v1)
            nxt_logit = torch.where(here, lf.gather(1, (nxt - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], nxt_logit)
        ids_out.append(top_i)
        logp_out.append(top_v - lse[:, None])
        ce_out.append(lse - nxt_logit)
    return torch.cat(ids_out), torch.cat(logp_out), torch.cat(ce_out)


def whole_logits_note(net, batch_size: int, window: int, vocab_size: int) -> str | None:
    """For a model whose logits extraction must take whole (not `head_usable`): what a batch of them
    holds, as a warning; None for the others."""
    if head_usable(net):
        return None
    size = size_text(batch_size * window * vocab_size * next(net.parameters()).element_size())
    return (f"{type(net).__name__}'s logits are not its linear output layer's alone (it transforms them), so "
            f"extraction holds each batch's whole logits: {batch_size} × {window} × {vocab_size:,} = {size}; "
            "lower --batch-size if memory runs short")


def _position_tiles(net, ids, positions, vocab_size: int, fused_head: bool, **kwargs) -> Tile:
    """Run `net` over `ids` [B, w]; logits of the flat (row-major) `positions` (int64 [n]) tile by tile.

    fused_head: the model runs with its output layer fed an empty slice and that layer is applied to the
    kept hidden states per tile, so no [B, w, V] logits exist (`fusekit.models.head`); else the model's
    own logits are sliced. ModelLoadError when the logit count differs from `vocab_size`.
    """
    import torch

    if not fused_head:
        logits = model_logits(net, ids, vocab_size, **kwargs).flatten(0, 1)
        return lambda r0, r1, v0, v1: logits[:, v0:v1].index_select(0, positions[r0:r1])
    head = output_layer(net)
    check_logit_count(head.out_features, vocab_size)
    with capture_head_input(head) as seen:
        net(input_ids=ids, use_cache=False, **kwargs)
    hidden = seen[-1].flatten(0, 1).index_select(0, positions)
    weight, bias = head.weight, head.bias
    return lambda r0, r1, v0, v1: torch.nn.functional.linear(hidden[r0:r1], weight[v0:v1], None if bias is None else bias[v0:v1])


def _results(net, ids, spans: Sequence[tuple[int, int, int]], k: int, vocab_size: int, fused_head: bool | None, **kwargs) -> list[WindowResult]:
    """One forward pass over `ids` [B, w]; a WindowResult per (row, start, length) span of real tokens
    (padding is never reduced), CE NaN at each span's last position."""
    import torch

    width = ids.shape[1]
    positions = torch.cat([torch.arange(n) + (row * width + start) for row, start, n in spans]).to(ids.device)
    flat = ids.flatten()
    next_ids = flat[(positions + 1).clamp(max=flat.numel() - 1)]  # a span's last position: its CE is set NaN
    fused = head_usable(net) if fused_head is None else fused_head
    tile = _position_tiles(net, ids, positions, vocab_size, fused, **kwargs)
    top_i, top_v, ce = topk_and_ce(tile, positions.numel(), vocab_size, next_ids, k)
    top_i, top_v, ce = top_i.to(torch.int32).cpu().numpy(), top_v.cpu().numpy(), ce.cpu().numpy()
    out, at = [], 0
    for _, _, n in spans:
        window_ce = ce[at : at + n].copy()
        window_ce[-1] = np.nan
        out.append(WindowResult(topk_ids=top_i[at : at + n], topk_logp=top_v[at : at + n], ce=window_ce))
        at += n
    return out


def forward_topk(net, windows: Sequence[np.ndarray], k: int, vocab_size: int, pad_id: int = 0,
                 fused_head: bool | None = None) -> list[WindowResult]:
    """One padded forward pass over `windows` (token id arrays); per window the top-k under the full
    softmax and the CE of each next token. Padding sits on the right, so real positions are unaffected.

    fused_head: apply the output layer a chunk of positions at a time (memory O(chunk × V), not
    O(batch × window × V)); None: wherever `head_usable(net)`. Same values either way up to float rounding.
    """
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
        spans = [(i, 0, n) for i, n in enumerate(lengths)]
        return _results(net, ids.to(device), spans, k, vocab_size, fused_head, attention_mask=attn.to(device))


def forward_topk_packed(net, windows: Sequence[np.ndarray], rows: Sequence[Sequence[int]], k: int, vocab_size: int,
                        fused_head: bool | None = None) -> dict[int, WindowResult]:
    """One forward pass over `rows` of packed windows (see `packed_rows`); window index → its result.

    The same values as one window at a time (up to float rounding): attention stays inside each window.
    Only valid for models where `packing_supported(net)`. fused_head: as in `forward_topk`.
    """
    import torch

    device = next(net.parameters()).device
    ids_np, pos_np = packed_rows(windows, rows)
    spans, order = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            spans.append((r, at, len(windows[i])))
            order.append(i)
            at += len(windows[i])
    with torch.inference_mode():
        ids = torch.as_tensor(ids_np, device=device)
        results = _results(net, ids, spans, k, vocab_size, fused_head, position_ids=torch.as_tensor(pos_np, device=device))
    return dict(zip(order, results))
