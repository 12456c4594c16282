"""On-policy distillation (GKD, Agarwal et al. 2024, arXiv 2306.13649): some micro-batches train on the
target's own samples instead of the corpus, with the teachers scoring the samples.

Which micro-batches: global micro-batch i is on-policy when u_i < `ratio`, u_i drawn from a generator
seeded by (seed, i) — GKD's mixing weight λ between the fixed data and the student's samples, a pure
function of the seed and the micro-batch, so resume and DDP stay exact.

What is sampled, per corpus record of an on-policy micro-batch:
* a plain text: each of its windows in the micro-batch gives a prompt, the first `prompt_share` of the
  window's tokens; the target continues it up to the window's length. The sampled tokens are decoded to
  text and that text is treated as a corpus text (every model tokenises it, so a non-canonical sampled
  tokenisation becomes the canonical one);
* a chat (`messages`): the conversation before its last assistant turn, rendered by the *target's* chat
  template with the generation prompt, is the prompt (once per record); the target's answer, up to the
  window's length in all, replaces the last assistant turn. The new conversation is a chat record again,
  so each model renders it through its *own* template (`corpus.tokenize`), the loss mask covers the
  sampled answer, and the byte-span transfer carries the teachers' top-k across the templates as for
  chat corpora. Every model needs a chat template for this (`require_chat_templates`, checked at start).
Then `OnlineWindows.align_records` transfers the teachers' top-k onto the target's tokens and the
fused step trains on it.

Sampling: the target (the weights of that step, eval mode, no gradients) continues all the micro-batch's
prompts in one batched `generate` call (left padding, attention mask, KV cache). Each row draws with its
own CPU generator seeded by (seed, micro-batch, row) through the Gumbel-max trick — greedy decoding of
logits/T + Gumbel noise is an exact sample of softmax(logits/T) — so a row's tokens depend on its seed
and its own logits only, not on the other rows of the batch (`sample_batch`). Generation stops at the
target's end-of-sequence or end-of-turn token (not kept).

Sampling runs in the training thread between steps (`prepare`, called by the engine before a step's
micro-batches are counted), never in the loader thread, which would see weights mid-update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from fusekit.corpus import Record, has_chat_template
from fusekit.train.examples import TrainDataError, window_example
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


def require_chat_templates(models: Sequence[tuple[str, object]]) -> None:
    """Refuse on-policy sampling of chat data when a model (`(ref, tokenizer)` pairs: the target, then the
    teachers) has no chat template: its scores of the sampled answer would be of a rendering it was never
    trained on. Raises TrainDataError naming the first such model and the ways out."""
    for i, (ref, tokenizer) in enumerate(models):
        if not has_chat_template(tokenizer):
            role = "the target" if i == 0 else f"teacher {i}"
            leave_out = "" if i == 0 else ", leave this teacher out"
            raise TrainDataError(
                f"{ref} ({role}) has no chat template, and on-policy sampling of chat data renders each sampled answer "
                f"through every model's own template: give it one (`chat_template` in its tokenizer_config.json){leave_out}, "
                "or train off-policy (--on-policy-ratio 0), where a model without a template reads chats in the plain "
                "'role: content' format"
            )


def chat_prompt(messages: list[dict]) -> list[dict]:
    """The messages the answer is sampled after: all before the last assistant turn (all when none)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return list(messages[:last])


def render_chat_prompt(tokenizer, messages: list[dict]) -> np.ndarray:
    """`messages` through the tokenizer's chat template with the generation prompt, as token ids (no
    special tokens added: the template writes its own, as `corpus.tokenize` reads chats). int64 [n]."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)


def stop_ids(eos: int | None, eot: int | None, lm: torch.nn.Module | None = None) -> list[int]:
    """The ids generation stops at: the target's end of sequence and end of turn (`VocabInfo.eos/eot`) and
    its generation config's `eos_token_id` (an int or a list)."""
    found = [i for i in (eos, eot) if isinstance(i, int)]
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    found += [configured] if isinstance(configured, int) else list(configured or [])
    return sorted(set(int(i) for i in found))


class _RowGumbel(LogitsProcessor):
    """Row b's scores / T plus Gumbel noise from row b's own generator: the greedy choice over the sum is an
    exact sample of softmax(scores / T) (Gumbel-max), and each row's draws depend on its seed alone."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u))  # u = 0 gives −inf: that token is never drawn (probability 2⁻⁵³)
        # float64: the choice is the argmax of the exact sum, whatever the logits' dtype
        return scores.double() / self.temperature + gumbel.to(scores.device)


@dataclass
class Samples:
    sequences: list[np.ndarray]  # int64 [≤ length]: the prompt and its continuation, the stop token not kept
    stopped: list[bool]  # whether the row ended at a stop token (else at its length)


@torch.no_grad()
def sample_batch(lm: torch.nn.Module, prompts: Sequence[np.ndarray], lengths: Sequence[int], seeds: Sequence[int],
                 stop: Sequence[int] = (), pad: int = 0, temperature: float = 1.0) -> Samples:
    """Each prompt continued by sampling from `lm` up to `lengths[b]` tokens in all, fewer when a `stop` id is
    drawn: one `generate` call for the batch (prompts left-padded with `pad` under an attention mask).

    Row b draws with a CPU generator seeded with `seeds[b]` (`_RowGumbel`), so its tokens are those of the
    same call on that row alone, up to float rounding of the batched forward (left padding with a mask
    changes no value of the row's logits beyond the last bits; a draw flips only on a near-tie of
    logits/T + noise). `lm` must be in eval mode."""
    if not prompts:
        return Samples([], [])
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    budget = [max(0, int(n) - len(p)) for p, n in zip(prompts, lengths)]
    if max(budget) == 0:
        return Samples([p.copy() for p in prompts], [False] * len(prompts))
    device = next(lm.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.as_tensor(p)
        mask[b, width - len(p):] = 1
    stop = [int(s) for s in stop]
    # Every generation option that could add a logits processor is set to its neutral value, so the
    # model's own generation_config.json (repetition penalty, sampling defaults, …) changes nothing.
    config = GenerationConfig(
        max_new_tokens=max(budget), min_new_tokens=0, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=stop or None, pad_token_id=int(pad), bos_token_id=None, repetition_penalty=1.0,
        no_repeat_ngram_size=0, temperature=1.0, top_p=1.0, renormalize_logits=False,
    )
    out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                      logits_processor=LogitsProcessorList([_RowGumbel(seeds, temperature)]))
    new = out[:, width:].cpu().numpy()
    sequences, stopped = [], []
    for b, p in enumerate(prompts):
        row = new[b, : budget[b]]
        ends = np.flatnonzero(np.isin(row, stop)) if stop else np.empty(0, dtype=np.int64)
        cut = int(ends[0]) if ends.size else len(row)
        sequences.append(np.concatenate([p, row[:cut].astype(np.int64)]))
        stopped.append(bool(ends.size))
    return Samples(sequences, stopped)


def sample(lm: torch.nn.Module, prompt: np.ndarray, length: int, seed: int, eos: int | None, temperature: float = 1.0) -> np.ndarray:
    """`prompt` continued by sampling from `lm` up to `length` tokens in all (fewer when `eos` is drawn; the
    EOS is not kept): `sample_batch` on one row. int64 [≤ length]."""
    return sample_batch(lm, [prompt], [length], [seed], [] if eos is None else [eos], temperature=temperature).sequences[0]


@dataclass
class Prompts:
    """An on-policy micro-batch before sampling: each prompt, the length to sample to, and for a chat the
    messages the answer follows (None: a plain text's window)."""

    index: int  # global micro-batch
    prompts: list[np.ndarray]  # int64 token ids
    lengths: list[int]  # total tokens per sequence (prompt + continuation) at most
    chats: list[list[dict] | None]


class OnPolicyObjective(FusionObjective):
    """`FusionObjective` whose micro-batches are, with probability `ratio`, the target's samples scored by
    the teachers (`OnlineWindows`); the rest are the corpus's, as off-policy."""

    def __init__(self, plan, cfg, step_module, source, ratio: float, prompt_share: float = 0.5, temperature: float = 1.0):
        super().__init__(plan, cfg)
        self.step_module, self.source = step_module, source
        self.ratio, self.prompt_share, self.temperature = float(ratio), float(prompt_share), float(temperature)
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
            out.append(self._prompts(i, batch))
        return out

    def _prompts(self, index: int, batch: Batch) -> Prompts:
        """The prompts of micro-batch `index` (read as `batch`): a text window's first `prompt_share`, or a
        chat record's conversation before its last answer (once per record)."""
        target = self.source.target
        _, rows = self.plan.segments(index)
        prompts, lengths, chats, chats_seen = [], [], [], set()
        for r, row in enumerate(rows):
            at = 0
            for window, s, e in row:
                n = e - s
                text = self.source.text_of(window)
                messages = self.source.records[text].messages
                if messages is None:
                    keep = max(1, int(n * self.prompt_share))
                    prompts.append(batch.input_ids[r, at : at + keep].copy())
                    lengths.append(n)
                    chats.append(None)
                elif text not in chats_seen:
                    chats_seen.add(text)
                    before = chat_prompt(messages)
                    ids = render_chat_prompt(target.tokenizer, before)
                    if len(ids) < target.window:  # else no room to answer: the record is left out of this batch
                        prompts.append(ids)
                        lengths.append(target.window)
                        chats.append(before)
                at += n
        return Prompts(index, prompts, lengths, chats)

    def prepare(self, model, batches: list, step: int, device) -> list:
        return [self._sampled(b) if isinstance(b, Prompts) else b for b in batches]

    def _sampled(self, p: Prompts) -> Batch:
        """The micro-batch of samples: sampled with the step's weights, aligned and fused like corpus texts."""
        lm = self.step_module.lm
        tok, info = self.source.target.tokenizer, self.source.target.info
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else (getattr(tok, "eos_token_id", None) or 0)
        was_training = lm.training
        lm.eval()
        try:
            drawn = sample_batch(lm, p.prompts, p.lengths, [_seed(self.cfg.seed, p.index, j) for j in range(len(p.prompts))],
                                 stop_ids(info.eos, info.eot, lm), pad=pad, temperature=self.temperature)
        finally:
            lm.train(was_training)
        self.samples += len(drawn.sequences)
        records = []
        for j, (seq, prompt, chat, stopped) in enumerate(zip(drawn.sequences, p.prompts, p.chats, drawn.stopped)):
            if chat is None:
                text = tok.decode(seq.tolist(), skip_special_tokens=True)
                if text:  # an end of document only where the target ended it
                    records.append((j, Record(text=text, eos=stopped)))
            else:
                answer = tok.decode(seq[len(prompt):].tolist(), skip_special_tokens=True)
                records.append((j, Record(messages=[*chat, {"role": "assistant", "content": answer}])))
        windows = self.source.align_records(records) if records else []
        plan = self.plan
        examples = [window_example(w, plan.fusion, plan.granularity, plan.with_target, plan.temperature, plan.require_loss_mask)
                    for w in windows]
        if not examples:
            return plan.empty_batch()
        layout = pack_rows if plan.pack else single_rows
        rows = layout([len(e.input_ids) for e in examples], plan.max_length, plan.piece_length)
        return collate([[(examples[item], s, e) for item, s, e in row] for row in rows], plan.with_target, packed=plan.pack)
