"""Everything the demo's recipe points at: corpora as JSONL files and the trained demo models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fusekit.demo.config import DemoConfig
from fusekit.demo.corpora import DOMAINS, Split, split_domain, write_jsonl
from fusekit.demo.experts import build_model

console = Console(stderr=True)


@dataclass
class DemoAssets:
    fusion_corpus: Path  # the three domains' fusion parts, interleaved
    heldout: dict[str, Path]  # domain → held-out JSONL
    target: Path
    experts: dict[str, Path]  # name → model folder


def _interleave(parts: list[list[str]]) -> list[str]:
    out: list[str] = []
    for i in range(max(len(p) for p in parts)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def prepare(cfg: DemoConfig, root: Path, progress: bool = True) -> DemoAssets:
    splits: dict[str, Split] = {
        d: split_domain(d, cfg.pretrain_chars, cfg.fusion_chars, cfg.heldout_chars) for d in DOMAINS
    }
    data = root / "data"
    fusion = write_jsonl(_interleave([splits[d].fusion for d in DOMAINS]), data / "fusion.jsonl")
    heldout = {d: write_jsonl(splits[d].heldout, data / f"heldout-{d}.jsonl") for d in DOMAINS}

    models = root / "models"

    def make(spec) -> Path:
        texts = _interleave([splits[d].pretrain for d in spec.domains])
        console.rule(f"[bold]pre-train · {spec.name} ({spec.arch}, {spec.tokenizer} {spec.vocab_size}) on {'+'.join(spec.domains)}")
        return build_model(
            spec, texts, models, window=cfg.window, lr=cfg.pretrain_lr, batch_size=cfg.batch_size,
            seed=cfg.seed, progress=progress,
        )

    experts = {spec.name: make(spec) for spec in cfg.experts}
    return DemoAssets(fusion_corpus=fusion, heldout=heldout, target=make(cfg.target), experts=experts)
