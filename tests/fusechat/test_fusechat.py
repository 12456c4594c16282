"""`fusekit fusechat`: pairwise fusion of chat models into a pivot, then VaRM, from one config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusekit import zoo
from tiny_models import THREE_FAMILIES, build_models


def _chat_records(texts: list[str]) -> list[dict]:
    out = []
    for t in texts:
        first, _, rest = t.strip().partition("\n")
        out.append({"messages": [{"role": "user", "content": first[:200]}, {"role": "assistant", "content": rest[:1500]}]})
    return out


@pytest.fixture(scope="module")
def fusechat_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fusechat")
    texts = zoo.stdlib_texts("prose")
    families = dict(zip(("pivot", "chat-a", "chat-b"), THREE_FAMILIES.values()))
    build_models(root, families, texts[:40])
    for name, rows in (("chat.jsonl", _chat_records(texts[:16])), ("heldout.jsonl", _chat_records(texts[60:63]))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "workdir": "work",
        "pivot": {"name": "pivot", "model": "pivot"},
        "sources": [{"name": "chat-a", "model": "chat-a"}, {"name": "chat-b", "model": "chat-b"}],
        "corpus": {"name": "chat", "data": "chat.jsonl"},
        "eval": [{"name": "heldout", "data": "heldout.jsonl"}],
        "extract": {"top_k": 4, "max_length": 64, "batch_size": 8},
        "train": {"lr": 3e-3, "batch_size": 4, "max_length": 64, "max_steps": 3, "warmup_ratio": 0.0},
        "pair": {"fusion": "min_ce", "lam": 0.5},
        "merge": {"method": "varm"},
    }
    path = root / "fusechat.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_fusechat_fuses_each_pair_then_merges_with_varm(fusechat_config):
    done = subprocess.run(
        [sys.executable, "-m", "fusekit.cli", "fusechat", str(fusechat_config), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    work = fusechat_config.parent / "work"
    results = json.loads((work / "results.json").read_text())
    models = {r["model"] for r in results["eval"]}
    assert models == {"pivot (pivot)", "chat-a", "chat-b", "pivot+chat-a", "pivot+chat-b", "merged (varm)"}
    assert all(np.isfinite(r["mean_ce"]) for r in results["eval"])
    assert set(results["align_report"]) == {"chat-a", "chat-b"}

    # Each pair trained the pivot on its own aligned store (pivot + one source).
    for name in ("chat-a", "chat-b"):
        manifest = json.loads((work / "pairs" / name / "aligned" / "manifest.json").read_text())
        assert name in json.dumps(manifest)

    # VaRM, computed here from the saved tensors: W_j ∝ mean((θ_j − θ_pivot)²) per matrix.
    pivot = _tensors(fusechat_config.parent / "pivot")
    fused = [_tensors(work / "pairs" / n / "model") for n in ("chat-a", "chat-b")]
    merged = _tensors(work / "merged")
    checked = 0
    for name, base in pivot.items():
        if base.ndim != 2:
            continue
        var = np.array([np.mean((f[name].astype(np.float64) - base) ** 2) for f in fused])
        if var.sum() == 0:
            continue
        w = var / var.sum()
        expected = sum(wj * f[name].astype(np.float64) for wj, f in zip(w, fused))
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 3

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(work / "merged").config.model_type == "llama"

    # Re-running finds every stage complete and changes nothing.
    before = (work / "merged" / "fusekit_merge.json").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "fusekit.cli", "fusechat", str(fusechat_config), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "merged" / "fusekit_merge.json").read_bytes() == before
