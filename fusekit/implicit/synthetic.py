"""A verifiable synthetic task for implicit fusion, built offline in seconds (tests, benchmark, docs).

Task: "<verb> x" → "x" (copy the letter), scored by `exact_match`. Train and held-out prompts use
different (verb, letter) combinations. Models, each its own architecture and tokenizer family:

* target: Llama + byte-level BPE, random init (mean reward ≈ 0 before training);
* good:   GPT-2 + WordPiece, fine-tuned on the gold answers of every combination (a strong source);
* bad:    GPT-NeoX + another BPE, random init (reward ≈ 0: a weak source).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

LETTERS = "bcdfghjkmnpqrstvwz"
VERBS = ("say", "repeat", "echo", "write")


def task_records(split: str) -> list[dict]:
    """Prompt records ({id, messages, reference}); `held-out` is every 4th (verb, letter) combination."""
    out = []
    for v, verb in enumerate(VERBS):
        for i, letter in enumerate(LETTERS):
            held = (v + i) % 4 == 0
            if (split == "held-out") == held:
                out.append({"id": f"{verb}-{letter}", "messages": [{"role": "user", "content": f"{verb} {letter}"}], "reference": letter})
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _texts() -> list[str]:
    records = task_records("train") + task_records("held-out")
    return [f"user: {r['messages'][0]['content']}\nassistant: {r['reference']}" for r in records] * 4


def build_task(root: Path, seed: int = 0, good_epochs: float = 15.0) -> dict[str, Path]:
    """Write prompts.jsonl, heldout.jsonl and the three models under ROOT; returns name → path."""
    import fusekit.zoo as zoo
    from fusekit.implicit.config import SFTOptions
    from fusekit.implicit.prompts import Prompt
    from fusekit.implicit.tune import run_sft

    root = Path(root)
    paths = {
        "prompts": write_jsonl(task_records("train"), root / "prompts.jsonl"),
        "heldout": write_jsonl(task_records("held-out"), root / "heldout.jsonl"),
    }
    texts = _texts()
    small = dict(hidden=64, layers=2, heads=2, context=64)
    paths["target"] = zoo.build_tiny_model("llama", zoo.train_tokenizer("bpe", texts, 120), root / "target", seed=seed, **small)
    paths["bad"] = zoo.build_tiny_model("gpt_neox", zoo.train_tokenizer("bpe", texts[::-1], 100), root / "bad", seed=seed + 1, **small)
    good_init = zoo.build_tiny_model("gpt2", zoo.train_tokenizer("wordpiece", texts, 90), root / "good-init", seed=seed + 2, **small)
    gold = task_records("train") + task_records("held-out")
    prompts = {r["id"]: Prompt(r["id"], r["messages"], r["reference"]) for r in gold}
    frame = pl.DataFrame({"prompt_id": [r["id"] for r in gold], "response": [r["reference"] for r in gold]})
    if not (root / "good-train" / "model").is_dir():
        run_sft(good_init, prompts, frame, SFTOptions(lr=3e-3, epochs=good_epochs, batch_size=8, seed=seed), root / "good-train")
    paths["good"] = root / "good-train" / "model"
    return paths


def task_config(root: Path, paths: dict[str, Path], seed: int = 0, **overrides) -> dict:
    """An implicit-fusion config (as a mapping) for the task: target ← {good, bad}."""
    config = {
        "workdir": str(root / "run"),
        "target": {"name": "target", "model": str(paths["target"])},
        "sources": [{"name": "good", "model": str(paths["good"])}, {"name": "bad", "model": str(paths["bad"])}],
        "prompts": {"data": str(paths["prompts"])},
        "eval": {"data": str(paths["heldout"])},
        "sample": {"n": 4, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seed": seed, "batch_size": 16},
        "reward": {"function": "exact_match"},
        "sft": {"lr": 3e-3, "epochs": 40, "batch_size": 8, "seed": seed},
        "dpo": {"lr": 2e-4, "epochs": 3, "batch_size": 8, "beta": 0.1, "seed": seed},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config
