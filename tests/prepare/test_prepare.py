"""`fusekit prepare`: pieces within every tokenizer's budget, the text kept whole, EOS only at the end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fusekit.corpus import read_records, tokenize_with_offsets
from fusekit.prepare import prepare_corpus


def test_pieces_fit_every_tokenizer_and_rebuild_the_text(tmp_path, tokenizers_by_kind, corpus_texts):
    toks = [tokenizers_by_kind["bpe"], tokenizers_by_kind["unigram"]]
    # Long prose, a short text, one unbroken run, and unbroken runs followed by a space (a long word, CJK).
    texts = corpus_texts[:6] + ["short one", "x" * 3000, "y" * 400 + " ok", "猫が好き" * 60 + " 🐱"]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stats = prepare_corpus(data, tmp_path / "out.jsonl", toks, max_length=64)
    records = list(read_records(tmp_path / "out.jsonl"))
    assert stats.texts == len(texts) and stats.pieces == len(records) > len(texts) and stats.cut >= 2
    for r in records:
        for t in toks:
            assert len(t(r.text, add_special_tokens=False)["input_ids"]) <= 63
    # Concatenating the pieces of each document gives the document back; only its last piece ends it.
    rebuilt, current = [], ""
    for r in records:
        current += r.text
        if r.eos:
            rebuilt.append(current)
            current = ""
    assert rebuilt == texts
    tok = tokenizers_by_kind["bpe"]
    middle = next(r for r in records if not r.eos)
    assert tokenize_with_offsets(tok, middle, append_eos=True).input_ids[-1] != tok.eos_token_id or tok.eos_token_id is None


def test_cli_prepare_names_its_output(tmp_path, tokenizers_by_kind):
    from fusekit import zoo
    from fusekit.cli import app

    model = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], tmp_path / "m", seed=0, hidden=32)
    data = tmp_path / "in.txt"
    data.write_text("alpha beta gamma\n" * 3)
    result = CliRunner().invoke(app, ["prepare", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "o.jsonl"), "--max-length", "64"])
    assert result.exit_code == 0, result.output
    assert "3 pieces from 3 texts (0 cut)" in result.output


def test_cli_prepare_takes_bare_tokenizers_and_says_what_it_skipped(tmp_path, tokenizers_by_kind):
    from fusekit.cli import app

    bpe = tmp_path / "bpe.json"  # a bare tokenizer.json file
    tokenizers_by_kind["bpe"].backend_tokenizer.save(str(bpe))
    folder = tmp_path / "tok"  # a folder of tokenizer files, no model
    tokenizers_by_kind["bpe"].save_pretrained(folder)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "alpha beta"}\n{"text": "   "}\n{"text": "gamma delta"}\n')
    result = CliRunner().invoke(
        app, ["prepare", "--data", str(data), "--model", str(bpe), "--model", str(folder), "--out", str(tmp_path / "o.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert "2 pieces from 2 texts" in result.output
    assert "skipped 1 empty" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    bad = CliRunner().invoke(app, ["prepare", "--data", str(data), "--model", str(broken), "--out", str(tmp_path / "p.jsonl")])
    assert bad.exit_code != 0 and "broken.json" in bad.output and "Traceback" not in bad.output
