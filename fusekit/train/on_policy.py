"""On-policy distillation (GKD, Agarwal et al. 2024, arXiv 2306.13649): some micro-batches train on the
target's own samples instead of the corpus, with the teachers scoring the samples.

Which micro-batches: global micro-batch i is on-policy when u_i < `ratio`, u_i drawn from a generator
seeded by (seed, i) — GKD's mixing weight λ between the fixed data and the student's samples, a pure
function of the seed and the micro-batch, so resume and DDP stay exact. An on-policy micro-batch takes the
first `prompt_share` of each of its corpus windows as a prompt; the target (the weights of that step, in
eval mode, no gradients) samples a continuation up to the window's length (temperature 1, stopping at
its end-of-sequence token) with a generator seeded by (seed, i, window); the sampled text is then treated
as a corpus text: every model tokenises it, the teachers' top-k is transferred onto the target's tokens
and fused (`OnlineWindows.align_records`), and the fused step trains on it. The samples are decoded to
text and tokenised again, so a non-canonical sampled tokenisation becomes the canonical one.

Sampling runs in the training thread between steps (`prepare`, called by the engine before a step's
micro-batches are counted), never in the loader thread, which would see weights mid-update.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from fusekit.corpus import Record
from fusekit.train.examples import window_example
from fusekit.train.loop import FusionObjective
from fusekit.train.rows import Batch, collate, pack_rows, single_rows


def is_on_policy(seed: int, index: int, ratio: float) -> bool:
    """Whether global micro-batch `index` trains on samples (probability `ratio`, fixed by the seed)."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    return bool(np.random.default_rng([seed, index, 0x6B64]).random() < ratio)


def _seed(seed: int, index: int, sequence: int) -> int:
    """The sampling seed of sequence `sequence` of global micro-batch `index`."""
    return int(np.random.SeedSequence([seed, index, sequence]).generate_state(1)[0])


@dataclass
class Prompts:
    """An on-policy micro-batch before sampling: each window's prompt and the length to sample to."""

    index: int  # global micro-batch
    prompts: list[np.ndarray]  # int64 token ids
    lengths: list[int]  # total tokens per sequence (prompt + continuation) at most


@torch.no_grad()
def sample(lm: torch.nn.Module, prompt: np.ndarray, length: int, seed: int, eos: int | None, temperature: float = 1.0) -> np.ndarray:
    """`prompt` continued by sampling from `lm` up to `length` tokens in all (fewer when `eos` is drawn; the
    EOS is not kept). Draws on a CPU generator seeded with `seed`, so the tokens depend on the seed and the
    model's probabilities only. int64 [≤ length]."""
    device = next(lm.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    # transformers ≥ 5 names the KV cache `cache` (`past_key_values` still works there, with a warning).
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device)[None]
    out = lm(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    new: list[int] = []
    for _ in range(max(0, length - len(prompt))):
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=gen))
        if eos is not None and token == eos:
            break
        new.append(token)
        out = lm(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache_arg: past})
        past, logits = out.past_key_values, out.logits[:, -1]
    return np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(new, dtype=np.int64)])


class OnPolicyObjective(FusionObjective):
    """`FusionObjective` whose micro-batches are, with probability `ratio`, the target's samples scored by
    the teachers (`OnlineWindows`); the rest are the corpus's, as off-policy."""

    def __init__(self, plan, cfg, step_module, source, ratio: float, prompt_share: float = 0.5):
        super().__init__(plan, cfg)
        self.step_module, self.source = step_module, source
        self.ratio, self.prompt_share = float(ratio), float(prompt_share)
        self.samples = 0  # sequences sampled so far (for the record)

    def micro_batches(self, step: int, rank: int) -> list:
        plan, out = self.plan, []
        for i in plan.micro_indices(step, rank):
            if i is None:
                out.append(plan.empty_batch())
                continue
            batch = plan.micro_batch(i)  # read even when replaced: the plan's reading stays in order
            if not is_on_policy(self.cfg.seed, i, self.ratio):
                out.append(batch)
                continue
            _, rows = plan.segments(i)
            prompts, lengths = [], []
            for r, row in enumerate(rows):
                at = 0
                for _, s, e in row:
                    n = e - s
                    keep = max(1, int(n * self.prompt_share))
                    prompts.append(batch.input_ids[r, at : at + keep].copy())
                    lengths.append(n)
                    at += n
            out.append(Prompts(i, prompts, lengths))
        return out

    def prepare(self, model, batches: list, step: int, device) -> list:
        return [self._sampled(b) if isinstance(b, Prompts) else b for b in batches]

    def _sampled(self, p: Prompts) -> Batch:
        """The micro-batch of samples: sampled with the step's weights, aligned and fused like corpus texts."""
        lm = self.step_module.lm
        tok = self.source.target.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        was_training = lm.training
        lm.eval()
        try:
            seqs = [sample(lm, prompt, n, seed=_seed(self.cfg.seed, p.index, j), eos=eos)
                    for j, (prompt, n) in enumerate(zip(p.prompts, p.lengths))]
        finally:
            lm.train(was_training)
        self.samples += len(seqs)
        records = [(j, Record(text=tok.decode(s.tolist(), skip_special_tokens=True))) for j, s in enumerate(seqs)]
        records = [(j, r) for j, r in records if r.text]
        windows = self.source.align_records(records) if records else []
        plan = self.plan
        examples = [window_example(w, plan.fusion, plan.granularity, plan.with_target, plan.temperature) for w in windows]
        if not examples:
            return plan.empty_batch()
        layout = pack_rows if plan.pack else single_rows
        rows = layout([len(e.input_ids) for e in examples], plan.max_length, plan.piece_length)
        return collate([[(examples[item], s, e) for item, s, e in row] for row in rows], plan.with_target, packed=plan.pack)
