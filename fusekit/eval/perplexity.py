"""Mean next-token cross-entropy and perplexity of a model over a corpus.

Texts are cut into windows of `max_length` tokens as extraction does; windows are packed into rows
with per-window attention (the training packer), so no compute goes to padding.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fusekit.corpus import CorpusError, Record, read_records, tokenize_record, windows_of
from fusekit.train.examples import IGNORE, Example
from fusekit.train.rows import collate, pack_rows
from fusekit.models.load import load_model, load_tokenizer


def _examples(tokenizer, records, max_length: int) -> tuple[list[Example], int]:
    examples, texts = [], 0
    for record in records:
        ids, mask = tokenize_record(tokenizer, record)
        texts += 1
        for s, e in windows_of(ids, max_length):
            w = ids[s:e]
            labels = np.full(len(w), IGNORE, dtype=np.int64)
            labels[:-1] = w[1:]
            if mask is not None:
                labels[:-1][~mask[s + 1 : e]] = IGNORE
            examples.append(Example(w, labels, None, None))
    return examples, texts


@torch.no_grad()
def evaluate_loaded(
    net,
    tokenizer,
    data: str | Path | Sequence[str],
    *,
    field: str = "text",
    max_length: int = 2048,
    batch_size: int = 8,
    progress: bool = True,
    label: str = "eval",
) -> dict:
    """`evaluate` with a model and tokenizer already loaded (to score several datasets in a row)."""
    if isinstance(data, (str, Path)):
        records = list(read_records(data, field))
    else:
        records = [Record(text=t) for t in data if t.strip()]
    if not records:
        raise CorpusError(f"no texts in {data}")
    ctx = getattr(net.config, "max_position_embeddings", None) or getattr(net.config, "n_positions", None)
    window = min(max_length, ctx) if ctx else max_length
    examples, texts = _examples(tokenizer, records, window)
    # Nats per character compare models whose tokenizers differ (per-token CE does not); chat
    # records score only some of their characters, so they get none.
    chars = sum(len(r.text) for r in records) if all(r.text is not None for r in records) else None
    rows = pack_rows([len(e.input_ids) for e in examples], window)
    device = next(net.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total, count = 0.0, 0
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress)
    with bar:
        task = bar.add_task(label, total=len(rows))
        for lo in range(0, len(rows), batch_size):
            chosen = rows[lo : lo + batch_size]
            batch = collate([[(examples[i], s, e) for i, s, e in row] for row in chosen], with_target=False)
            with autocast:
                logits = net(
                    input_ids=torch.as_tensor(batch.input_ids, device=device),
                    position_ids=torch.as_tensor(batch.position_ids, device=device),
                    use_cache=False,
                ).logits
            labels = torch.as_tensor(batch.labels, device=device)
            total += float(
                F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            )
            count += int((labels != IGNORE).sum())
            bar.update(task, advance=len(chosen))
    if count == 0:
        raise CorpusError(f"{data}: no token has a next token to predict (texts too short, or no assistant turns)")
    mean_ce = total / count
    return {
        "mean_ce": mean_ce,
        "perplexity": math.exp(mean_ce),
        "nats_per_char": total / chars if chars else None,
        "tokens": count,
        "chars": chars,
        "texts": texts,
        "windows": len(examples),
    }


def evaluate(
    model: str | Path,
    data: str | Path | Sequence[str],
    *,
    field: str = "text",
    max_length: int = 2048,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Mean CE (nats per predicted token) and perplexity of MODEL on DATA.

    DATA: a text file (one text per line), a folder of text files, JSONL (`field` or chat `messages`,
    scoring assistant tokens only), Parquet, or a list of strings. Returns mean_ce, perplexity,
    nats_per_char (total nats over the texts' characters; None for chat data), tokens (predicted),
    chars, texts, windows.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_model(model).to(dev).eval()
    tokenizer = load_tokenizer(model)
    return evaluate_loaded(
        net, tokenizer, data, field=field, max_length=max_length, batch_size=batch_size, progress=progress,
        label=Path(str(data)).name if isinstance(data, (str, Path)) else "eval",
    )
