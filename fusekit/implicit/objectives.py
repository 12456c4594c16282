"""The fine-tuning stages as objectives of the training engine (`fusekit.train.engine`).

* `SFTObjective`: cross-entropy on the response tokens; the loss is summed over response tokens and the
  engine divides by the step's response tokens (a token mean, as before).
* `PreferenceObjective`: DPO (or WRPO) on pairs (triples) with stored reference log-probs; the loss is
  summed over pairs and the engine divides by the step's pairs (a pair mean).

Batches are a pure function of (seed, epoch, step): order = permutation(seed, epoch), then consecutive
slices of `batch_size` — so a stage resumed from a checkpoint sees the batches an uninterrupted one
would. One micro-batch per step; under torchrun rank r of W takes items r, r + W, … of the step's slice
(`batch_size` stays the global batch), so W processes compute what one does.

`forward` gets the engine's step module, `fusekit.train.head.LogpStep` (possibly wrapped in DDP/FSDP2):
`model(input_ids, attention_mask, labels)` → each sequence's summed log-prob, from the output layer in
chunks (never [B, L, V] logits) or from the logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fusekit.implicit.dpo import dpo_loss, wrpo_loss
from fusekit.implicit.sequences import IGNORE, Encoded, SeqBatch, collate


class EpochOrder:
    """Which items step `step` trains on: slices of a per-epoch permutation seeded by (seed, epoch)."""

    def __init__(self, n_items: int, batch_size: int, epochs: float, seed: int):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.per_epoch = math.ceil(n_items / batch_size)
        self.total_steps = max(1, math.ceil(epochs * self.per_epoch))

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return order[within * self.batch_size : (within + 1) * self.batch_size]


def _idle(pad_id: int) -> Encoded:
    """One pad token with no label: the forward a rank without items runs to join the gradient all-reduce."""
    return Encoded(np.array([pad_id], dtype=np.int64), np.array([IGNORE], dtype=np.int64))


class SFTObjective:
    """Response-only cross-entropy over `items` (Encoded, labels IGNORE outside the response)."""

    sums = ("loss",)

    def __init__(self, items: Sequence[Encoded], pad_id: int, batch_size: int, epochs: float, seed: int, world_size: int = 1):
        self.items, self.pad_id, self.world_size = list(items), pad_id, world_size
        self.order = EpochOrder(len(self.items), batch_size, epochs, seed)
        self.total_steps = self.order.total_steps

    def micro_batches(self, step: int, rank: int) -> list[SeqBatch]:
        mine = [self.items[i] for i in self.order.indices(step)[rank :: self.world_size]]
        return [collate(mine or [_idle(self.pad_id)], self.pad_id)]

    def units(self, batch: SeqBatch) -> float:
        return int((batch.labels[:, 1:] != IGNORE).sum())  # label positions: every token but the first can be one

    def tokens(self, batch: SeqBatch) -> int:
        return int(batch.attention_mask.sum()) if self.units(batch) else 0

    def forward(self, model, batch: SeqBatch, step: int, device):
        b = batch.to(device)
        loss = -model(b.input_ids, b.attention_mask, b.labels).sum()
        return loss, loss.detach().reshape(1)

    def report(self, sums: list[float], units: float, step: int) -> dict:
        return {"loss": sums[0] / max(units, 1.0)}


class PreferenceObjective:
    """DPO (columns chosen, rejected) or WRPO (chosen, chosen_self, rejected) against stored reference
    log-probs.

    `encoded[c][i]`: response column c of pair i; `refs[c]`: float [n_pairs] log π_ref of column c.
    WRPO's fusion coefficient rises linearly from 0 at the first step to `alpha` at the last.
    """

    sums = ("loss", "reward_accuracy", "margin")

    def __init__(self, encoded: Sequence[Sequence[Encoded]], refs: Sequence[np.ndarray], pad_id: int, *,
                 objective: str, beta: float, alpha: float, batch_size: int, epochs: float, seed: int, world_size: int = 1):
        self.encoded, self.pad_id, self.world_size = encoded, pad_id, world_size
        self.refs = [np.asarray(r, dtype=np.float32) for r in refs]
        self.objective, self.beta, self.alpha = objective, beta, alpha
        self.order = EpochOrder(len(encoded[0]), batch_size, epochs, seed)
        self.total_steps = self.order.total_steps

    def alpha_at(self, step: int) -> float:
        return self.alpha * (step / (self.total_steps - 1) if self.total_steps > 1 else 1.0)

    def micro_batches(self, step: int, rank: int) -> list[tuple[np.ndarray, SeqBatch]]:
        idx = self.order.indices(step)[rank :: self.world_size]
        # every response column of the step in one forward pass: [chosen…; (chosen_self…;) rejected…]
        items = [column[i] for column in self.encoded for i in idx]
        return [(idx, collate(items or [_idle(self.pad_id)], self.pad_id))]

    def units(self, batch) -> float:
        return len(batch[0])

    def tokens(self, batch) -> int:
        return int(batch[1].attention_mask.sum()) if len(batch[0]) else 0

    def forward(self, model, batch, step: int, device):
        import torch

        idx, seqs = batch
        n = len(idx)
        b = seqs.to(device)
        logps = model(b.input_ids, b.attention_mask, b.labels)
        if n == 0:  # this rank has no pair this step: a zero loss that still reaches every weight
            zero = logps.sum() * 0.0
            return zero, torch.zeros(len(self.sums), device=device)
        parts = [logps[k * n : (k + 1) * n] for k in range(len(self.encoded))]
        refs = [torch.as_tensor(r[idx], device=device) for r in self.refs]
        if self.objective == "wrpo":
            out = wrpo_loss(*parts, *refs, beta=self.beta, alpha=self.alpha_at(step))
        else:
            out = dpo_loss(parts[0], parts[1], refs[0], refs[1], self.beta)
        loss = out.losses.sum()
        correct = (out.chosen_reward > out.rejected_reward).float().sum()
        margin = (out.chosen_reward - out.rejected_reward).sum()
        return loss, torch.stack([loss.detach(), correct, margin])

    def report(self, sums: list[float], units: float, step: int) -> dict:
        loss, correct, margin = (v / max(units, 1.0) for v in sums)
        row = {"loss": loss, "reward_accuracy": correct, "margin": margin}
        if self.objective == "wrpo":
            row["alpha"] = self.alpha_at(step)
        return row
