"""The demo's models: domain experts and a generalist target, made offline and trained by fusekit.

Each model gets its own tokenizer (trained with `tokenizers` on its own training text) and its own
architecture, so alignment meets what it meets with real models: different vocabularies, different
word-boundary markers, different sizes. Pre-training is `fusekit.train` with λ = 1 (plain CLM) on
windows of the model's text — the same loop the fusion stage uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


import fusekit.zoo as zoo
from fusekit.store.types import AlignedWindow


@dataclass(frozen=True)
class ModelRecipe:
    """How one demo model is made."""

    name: str
    arch: zoo.Arch
    tokenizer: zoo.TokenizerKind
    vocab_size: int
    domains: tuple[str, ...]  # the domains whose pretrain text it learns from
    hidden: int
    layers: int
    steps: int  # pre-training optimizer steps


def clm_windows(tokenizer, texts: Sequence[str], window: int) -> list[AlignedWindow]:
    """Texts windowed as extraction windows them, with no fusion candidates (λ = 1 training data)."""
    from fusekit.corpus import Record, tokenize_record, windows_of

    out: list[AlignedWindow] = []
    for text_id, text in enumerate(texts):
        ids, _ = tokenize_record(tokenizer, Record(text=text))
        for w, (start, end) in enumerate(windows_of(ids, window)):
            if end - start >= 2:
                out.append(AlignedWindow(text_id=text_id, window=w, input_ids=ids[start:end]))
    return out


def build_model(
    spec: ModelRecipe,
    texts: Sequence[str],
    out: Path,
    *,
    window: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> Path:
    """Train the tokenizer, initialise the model from a config, pre-train it; returns the model folder.

    Finished models are kept (their `fusekit.train` run is complete), so a resumed demo skips them.
    """
    from fusekit.train import train
    from fusekit.train.checkpoint import read_done

    final = out / spec.name
    if read_done(final) is not None:
        return final
    init = out / f"{spec.name}-init"
    tokenizer = zoo.train_tokenizer(spec.tokenizer, texts, vocab_size=spec.vocab_size)
    heads = max(1, spec.hidden // 32)
    zoo.build_tiny_model(
        spec.arch, tokenizer, init, seed=seed, hidden=spec.hidden, layers=spec.layers, heads=heads, context=window
    )
    windows = clm_windows(tokenizer, texts, window)
    train(
        init,
        windows,
        final,
        lam=1.0,
        lr=lr,
        max_steps=spec.steps,
        epochs=1000.0,  # the step cap ends training; epochs only has to be large enough to reach it
        batch_size=batch_size,
        max_length=window,
        warmup_ratio=0.05,
        weight_decay=0.1,
        seed=seed,
        resume=True,
        progress=progress,
    )
    return final
