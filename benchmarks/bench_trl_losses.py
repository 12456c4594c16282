"""fusekit's kl / reverse_kl / jsd / uld / gold against TRL's own code, on the same teacher and student logits.

    /tmp/trl-venv/bin/python benchmarks/bench_trl_losses.py [--batch 8] [--length 128] [--vocab 1000] [--seed 0]

TRL is not a fusekit dependency: install it in a venv of its own (the shared environment's torch and
transformers seen through `--system-site-packages`):

    python -m venv --system-site-packages /tmp/trl-venv && /tmp/trl-venv/bin/pip install -q trl

TRL's functions called: `GKDTrainer.generalized_jsd_loss` (trl/experimental/gkd; β = 0 is KL(p‖q), β = 1
KL(q‖p)) and the GOLD trainer's `ULDLoss` (trl/experimental/gold; plain sorted-L1 ULD, and the hybrid:
generalized JSD on the ids whose token string both vocabularies share, sorted L1 on the rest). Random
logits, one vocabulary for teacher and student (GOLD: the same size, ids permuted, a share of the strings
shared). Values in float64, both sides reduced to a mean per position: TRL's `batchmean` with labels
divides by the unmasked positions (without labels it divides by the batch size only, a per-sequence sum),
ULDLoss by the sequence length and then averages over the batch; fusekit returns sums over positions,
divided here by their number. Timing: forward + backward to the student logits, float32, this machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
from _common import print_table

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
MASKED = -1e4  # a teacher logit that softmax turns into exactly 0 in float64 (−inf would make TRL's kl_div NaN)


def trl_functions():
    """(generalized_jsd_loss, ULDLoss) from the installed TRL, or exit with the install line."""
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
        from trl.experimental.gold.gold_trainer import ULDLoss
    except ImportError as err:
        sys.exit(f"TRL is needed ({err}): python -m venv --system-site-packages /tmp/trl-venv && "
                 "/tmp/trl-venv/bin/pip install -q trl; run this with /tmp/trl-venv/bin/python")
    return GKDTrainer.generalized_jsd_loss, ULDLoss


class _Vocab:
    """The one method ULDLoss asks of a tokenizer (its hybrid split is by token string)."""

    def __init__(self, vocab: dict[str, int]):
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def uld_loss(uld_cls, hybrid: bool, beta: float = 0.5, weights: tuple | None = (1.0, 1.0), tokenizers=(None, None)):
    """TRL's ULDLoss with no CE term, no EOS skipped, no byte-offset merging (positions already aligned)."""
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None if weights is None else weights[0],
        uld_hybrid_unmatched_weight=None if weights is None else weights[1], beta=beta,
    )
    return uld_cls(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])


def call_uld(loss, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ULDLoss on [B, L, V] student and teacher logits, every position an answer position."""
    return loss(student, teacher, labels, labels, labels, labels)


def fusekit_mean(student: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, loss: str,
                 beta: float | None = None) -> torch.Tensor:
    """fusekit's fusion term (λ = 0) per position: student [B, L, V], sparse teacher ids/probs [B, L, m]."""
    from fusekit.train.loss import fused_loss

    sums = fused_loss(student, labels, ids, probs, 0.0, loss=loss, beta=beta)
    return sums.total / labels.numel()


def full_teacher(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's whole softmax as a sparse top-k with k = V (ids [B, L, V], probs [B, L, V]): no rest."""
    v = teacher.shape[-1]
    ids = torch.arange(v).expand(teacher.shape).contiguous()
    return ids, teacher.softmax(-1)


def topk_teacher(teacher: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k: renormalised to sum 1 (what an aligned store keeps) or raw (rest = 1 − Σ)."""
    probs, ids = teacher.softmax(-1).topk(k, dim=-1)
    return ids, probs / probs.sum(-1, keepdim=True) if renormalise else probs


def masked_to_topk(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Teacher logits with everything outside its top-k at MASKED: TRL's view of a renormalised top-k teacher."""
    keep = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, teacher.topk(k, dim=-1).indices, True)
    return teacher.masked_fill(~keep, MASKED)


def gold_vocabularies(v: int, matched_share: float, gen: torch.Generator):
    """Two vocabularies of size v: student ids 0..v−1; teacher id t carries the student's string of perm[t]
    for a `matched_share` of ids and a teacher-only string otherwise. Returns (student, teacher, perm, matched)."""
    perm = torch.randperm(v, generator=gen)
    matched = torch.zeros(v, dtype=torch.bool)
    matched[torch.randperm(v, generator=gen)[: int(matched_share * v)]] = True
    student = {f"tok{s}": s for s in range(v)}
    teacher = {(f"tok{int(perm[t])}" if matched[t] else f"teacher_only{t}"): t for t in range(v)}
    return _Vocab(student), _Vocab(teacher), perm, matched


def gold_teacher_for_fusekit(teacher: torch.Tensor, perm: torch.Tensor, matched: torch.Tensor):
    """fusekit's view of TRL's vocabulary split: support S = the matched ids mapped to student ids, with
    the teacher's own (unrenormalised) probabilities; the unmatched mass becomes fusekit's rest bucket."""
    p = teacher.softmax(-1)[..., matched]
    ids = perm[matched].expand(p.shape).contiguous()
    return ids, p


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-300)


def value_rows(trl_jsd, uld_cls, student, teacher, labels, gen, k: int) -> list[list[object]]:
    """loss, TRL value, fusekit value, relative difference, note — float64."""
    rows = []
    ids, probs = full_teacher(teacher)

    def add(name, trl_value, fk_value, note):
        t, f = float(trl_value), float(fk_value)
        rows.append([name, f"{t:.10g}", f"{f:.10g}", f"{rel(t, f):.1e}", note])

    for beta in (0.1, 0.5, 0.9):
        add(f"jsd β={beta}, k=V", trl_jsd(student, teacher, labels=labels, beta=beta),
            fusekit_mean(student, ids, probs, labels, "jsd", beta), "same definition")
    add("kl (TRL β=0), k=V", trl_jsd(student, teacher, labels=labels, beta=0.0),
        fusekit_mean(student, ids, probs, labels, "kl"), "KL(p‖q)")
    add("reverse_kl (TRL β=1), k=V", trl_jsd(student, teacher, labels=labels, beta=1.0),
        fusekit_mean(student, ids, probs, labels, "reverse_kl"), "KL(q‖p); no floor when S = V")
    add("uld, k=V", call_uld(uld_loss(uld_cls, hybrid=False), student, teacher, labels),
        fusekit_mean(student, ids, probs, labels, "uld"), "sorted L1 over the whole vocabulary")

    # A store's teacher: its top-k renormalised. TRL sees the same distribution as logits masked outside it.
    masked = masked_to_topk(teacher, k)
    kids, kprobs = topk_teacher(teacher, k, renormalise=True)
    for name, beta in (("kl", 0.0), ("jsd", 0.5)):
        add(f"{name}{'' if beta == 0 else f' β={beta}'}, top-{k} renormalised",
            trl_jsd(student, masked, labels=labels, beta=beta),
            fusekit_mean(student, kids, kprobs, labels, name, beta if name == "jsd" else None),
            "exact: outside S only q_rest matters (p = 0)")
    add(f"reverse_kl, top-{k} renormalised", trl_jsd(student, masked, labels=labels, beta=1.0),
        fusekit_mean(student, kids, kprobs, labels, "reverse_kl"),
        f"TRL: q·(log q − {MASKED:g}), +∞ as the mask → −∞; fusekit floors p_rest at 1e-3")
    add(f"uld, top-{k} renormalised", call_uld(uld_loss(uld_cls, hybrid=False), student, masked, labels),
        fusekit_mean(student, kids, kprobs, labels, "uld"), "exact: zeros beyond k on both sides")

    # The raw top-k with its missing mass as one rest atom, against TRL on the whole teacher: not the same
    # quantity (fusekit coarse-grains the outside of S into one outcome).
    rids, rprobs = topk_teacher(teacher, k, renormalise=False)
    add(f"kl, top-{k} + rest vs TRL full", trl_jsd(student, teacher, labels=labels, beta=0.0),
        fusekit_mean(student, rids, rprobs, labels, "kl"), "KL of the lumped (S ∪ rest) pair ≤ full KL")
    add(f"jsd β=0.5, top-{k} + rest vs TRL full", trl_jsd(student, teacher, labels=labels, beta=0.5),
        fusekit_mean(student, rids, rprobs, labels, "jsd", 0.5), "same: lumping lowers every f-divergence")
    add(f"uld, top-{k} + rest vs TRL full", call_uld(uld_loss(uld_cls, hybrid=False), student, teacher, labels),
        fusekit_mean(student, rids, rprobs, labels, "uld"), "teacher's rest is one sorted atom, not its tail")

    # GOLD's hybrid: TRL splits the vocabulary by token string; fusekit by the transfer's support S.
    v = teacher.shape[-1]
    s_tok, t_tok, perm, matched = gold_vocabularies(v, 0.7, gen)
    gids, gprobs = gold_teacher_for_fusekit(teacher, perm, matched)
    hybrid = uld_loss(uld_cls, hybrid=True, beta=0.5, tokenizers=(s_tok, t_tok))
    add("gold β=0.5, 70% strings shared", call_uld(hybrid, student, teacher, labels),
        fusekit_mean(student, gids, gprobs, labels, "gold", 0.5),
        "JSD half equal; ULD half: TRL sorts the teacher's unmatched ids, fusekit has one rest atom")
    one = teacher.masked_fill(~matched & (torch.arange(v) != int((~matched).nonzero()[0])), MASKED)
    gids1, gprobs1 = gold_teacher_for_fusekit(one, perm, matched)
    add("gold β=0.5, unmatched mass on one id", call_uld(hybrid, student, one, labels),
        fusekit_mean(student, gids1, gprobs1, labels, "gold", 0.5), "exact up to TRL's clamp of p at 1e-8")
    adaptive = uld_loss(uld_cls, hybrid=True, beta=0.5, weights=None, tokenizers=(s_tok, t_tok))
    add("gold, TRL's default weights", call_uld(adaptive, student, teacher, labels),
        fusekit_mean(student, gids, gprobs, labels, "gold", 0.5),
        "TRL weighs |M|/V and 1 − |M|/V; fusekit 1 and 1")
    return rows


def per_second(fn, positions: int, repeat: int) -> float:
    """Positions per second of fn() (forward + backward), best of `repeat` after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return positions / best


def timing_rows(trl_jsd, uld_cls, student, teacher, labels, gen, k: int, repeat: int) -> list[list[object]]:
    """loss, TRL positions/s, fusekit (k = V) positions/s, fusekit (top-k) positions/s — float32."""
    n = labels.numel()
    full_ids, full_probs = full_teacher(teacher)
    k_ids, k_probs = topk_teacher(teacher, k, renormalise=True)
    s_tok, t_tok, perm, matched = gold_vocabularies(teacher.shape[-1], 0.7, gen)
    gids, gprobs = gold_teacher_for_fusekit(teacher, perm, matched)
    plain, hybrid = uld_loss(uld_cls, hybrid=False), uld_loss(uld_cls, hybrid=True, tokenizers=(s_tok, t_tok))

    def grad_of(compute):
        def run():
            leaf = student.detach().requires_grad_(True)
            compute(leaf).backward()
        return run

    trl = {
        "jsd β=0.5": lambda s: trl_jsd(s, teacher, labels=labels, beta=0.5),
        "uld": lambda s: call_uld(plain, s, teacher, labels),
        "gold β=0.5": lambda s: call_uld(hybrid, s, teacher, labels),
    }
    fk_full = {
        "jsd β=0.5": lambda s: fusekit_mean(s, full_ids, full_probs, labels, "jsd", 0.5),
        "uld": lambda s: fusekit_mean(s, full_ids, full_probs, labels, "uld"),
        "gold β=0.5": lambda s: fusekit_mean(s, gids, gprobs, labels, "gold", 0.5),
    }
    fk_top = {
        "jsd β=0.5": lambda s: fusekit_mean(s, k_ids, k_probs, labels, "jsd", 0.5),
        "uld": lambda s: fusekit_mean(s, k_ids, k_probs, labels, "uld"),
        "gold β=0.5": lambda s: fusekit_mean(s, k_ids, k_probs, labels, "gold", 0.5),
    }
    return [[name, f"{per_second(grad_of(trl[name]), n, repeat):,.0f}",
             f"{per_second(grad_of(fk_full[name]), n, repeat):,.0f}",
             f"{per_second(grad_of(fk_top[name]), n, repeat):,.0f}"] for name in trl]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    trl_jsd, uld_cls = trl_functions()
    import trl

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.length, args.vocab)
    # Scales 2 and 1.5 keep every teacher probability above 1e-8, where TRL's GOLD clamps it.
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    labels = torch.randint(0, args.vocab, shape[:2], generator=gen)
    print(f"TRL {trl.__version__}, torch {torch.__version__}; B={args.batch} L={args.length} V={args.vocab}, "
          f"top-k {args.top_k}, seed {args.seed}; min teacher probability {float(teacher.softmax(-1).min()):.1e}")
    print_table("fusekit against TRL: loss per position (float64)",
                ["loss", "TRL", "fusekit", "rel. diff", "note"],
                value_rows(trl_jsd, uld_cls, student, teacher, labels, gen, args.top_k))
    print_table(f"positions/s, forward + backward, float32, {torch.get_num_threads()} CPU threads",
                ["loss", "TRL (dense teacher)", "fusekit, k = V", f"fusekit, top-{args.top_k}"],
                timing_rows(trl_jsd, uld_cls, student.float(), teacher.float(), labels, gen, args.top_k,
                            args.repeat))


if __name__ == "__main__":
    main()
