"""AlignedWindows for the fusion/train tests: random ones, and ones carrying real tiny models' top-k."""

from __future__ import annotations

import numpy as np

from fusekit.store.types import AlignedWindow, Candidate


def random_candidate(rng: np.random.Generator, n: int, k: int, vocab: int, fallback_share: float = 0.0) -> Candidate:
    """Distinct ids per row (−1 padded at random), normalised probs, CE with NaN at fallbacks and the end."""
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = rng.random((n, k)).astype(np.float32) + 0.01
    empty = rng.random((n, k)) < 0.2
    empty[:, 0] = False
    ids[empty] = -1
    probs[empty] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    ce = (rng.random(n) * 4).astype(np.float32)
    ce[rng.random(n) < fallback_share] = np.nan
    ce[-1] = np.nan
    return Candidate(ids=ids, probs=probs, ce=ce, mean_ce=float(np.nanmean(ce)))


def random_window(
    rng: np.random.Generator, n: int, k: int, vocab: int, sources: int = 2, text_id: int = 0, window: int = 0
) -> AlignedWindow:
    cands = [random_candidate(rng, n, k, vocab)]
    cands += [random_candidate(rng, n, k, vocab, fallback_share=0.3) for _ in range(sources)]
    input_ids = rng.integers(0, vocab, size=n).astype(np.int64)
    return AlignedWindow(text_id=text_id, window=window, input_ids=input_ids, candidates=cands)


def model_candidate(model, input_ids: np.ndarray, k: int) -> Candidate:
    """A real model's top-k (renormalised over the k, with the mass the k held) and CE of the true next
    token on one window."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids)[None]).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(k, dim=-1)
    probs = torch.softmax(top.values, -1)
    ce = np.full(len(input_ids), np.nan, dtype=np.float32)
    ce[:-1] = (-logp[:-1].gather(1, torch.as_tensor(input_ids[1:])[:, None])[:, 0]).numpy()
    mass = top.values.double().exp().sum(-1).clamp(max=1.0).numpy().astype(np.float32)  # what the k held
    return Candidate(
        ids=top.indices.numpy().astype(np.int32), probs=probs.numpy(), ce=ce, mean_ce=float(np.nanmean(ce)), mass=mass
    )


def model_windows(target, sources, token_windows: list[np.ndarray], k: int = 4) -> list[AlignedWindow]:
    """AlignedWindows of models sharing the target's tokenizer (so candidates need no alignment)."""
    out = []
    for i, ids in enumerate(token_windows):
        cands = [model_candidate(m, ids, k) for m in [target, *sources]]
        out.append(AlignedWindow(text_id=i, window=0, input_ids=ids.astype(np.int64), candidates=cands))
    return out
