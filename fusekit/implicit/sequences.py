"""Prompt + response as the target reads them in training: token ids, response-only labels, log-probs.

The prompt is rendered with the target's own template (generation prompt on) and tokenised on its own;
the response text is tokenised on its own and closed with EOS. Tokenising the two parts separately
matches generation, where the model continues the prompt's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusekit.implicit.prompts import render_prompt

IGNORE = -100


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0 (padded positions are
    masked out, so any id will do)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@dataclass
class Encoded:
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]: the token at each position where it is a response token, IGNORE elsewhere


def encode(tokenizer, messages: list[dict], response: str, max_length: int) -> Encoded | None:
    """The training sequence; None when the prompt leaves no room for one response token.

    Too long a sequence keeps its first max_length tokens (the prompt whole, the response cut).
    """
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(int(tokenizer.eos_token_id))
    if len(prompt) >= max_length or not answer:
        return None
    ids = np.asarray((list(prompt) + answer)[:max_length], dtype=np.int64)
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE
    return Encoded(ids, labels)


@dataclass
class SeqBatch:
    input_ids: "object"  # torch.long [B, L], right-padded
    attention_mask: "object"  # torch.long [B, L]
    labels: "object"  # torch.long [B, L], IGNORE on prompt and padding

    def to(self, device) -> "SeqBatch":
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(items: Sequence[Encoded], pad_id: int, device=None) -> SeqBatch:
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e.input_ids)
        ids[r, :n] = torch.from_numpy(e.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.from_numpy(e.labels)
    return SeqBatch(ids.to(device), mask.to(device), labels.to(device))


def token_logps(net, batch: SeqBatch):
    """(log p of each label token [B, L−1] float32, mask of label positions [B, L−1] bool).

    Position t's logits score token t+1 (labels shifted by one); prompt and padding are masked out.
    """
    import torch

    logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logps(net, batch: SeqBatch):
    """Sum of the response tokens' log-probs per sequence: float32 [B] (log π(y | x) in DPO)."""
    logp, _ = token_logps(net, batch)
    return logp.sum(-1)
