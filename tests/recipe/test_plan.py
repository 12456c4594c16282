"""`fusekit plan` against what `fusekit run` then writes: exact token counts, bytes within 10%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusekit import zoo
from fusekit.corpus import read_records, tokenize_record
from fusekit.models.load import load_tokenizer
from tiny_models import THREE_FAMILIES, build_models


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """A target and two sources with different tokenizers and architectures, a corpus, an eval set."""
    root = tmp_path_factory.mktemp("plan")
    texts = zoo.stdlib_texts("prose")
    corpus, heldout = texts[:24], texts[60:64]
    build_models(root, THREE_FAMILIES, texts[:40])
    for name, rows in (("corpus.jsonl", corpus), ("heldout.jsonl", heldout)):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    recipe = {
        "workdir": "work",
        "target": {"name": "target", "model": "target"},
        "sources": [{"name": "gpt", "model": "gpt"}, {"name": "neox", "model": "neox"}],
        "corpus": {"name": "corpus", "data": "corpus.jsonl"},
        "eval": [{"name": "heldout", "data": "heldout.jsonl"}],
        "extract": {"top_k": 5, "max_length": 64, "batch_size": 8},
        "train": {
            "variants": [{"name": "minc", "fusion": "min_ce", "lam": 0.5}],
            "lr": 1e-3,
            "batch_size": 4,
            "max_length": 64,
            "max_steps": 2,
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _parquet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_plan_matches_what_run_writes(tiny_recipe):
    from fusekit.pipeline import Layout, run_recipe
    from fusekit.plan import plan_recipe, plan_table
    from fusekit.recipe import load_recipe

    recipe = load_recipe(tiny_recipe)
    plan = plan_recipe(recipe, sample_texts=8)
    assert plan_table(plan).row_count == len(plan["models"]) + 4

    # Token counts: independent of the planner, straight from each tokenizer.
    records = list(read_records(recipe.corpus.data))
    for spec in [recipe.target, *recipe.sources]:
        tok = load_tokenizer(spec.model)
        expected = sum(len(tokenize_record(tok, r, append_eos=True)[0]) for r in records)  # extraction ends each text with EOS
        assert plan["models"][spec.name]["tokens"] == expected

    result = run_recipe(recipe, progress=False)
    layout = Layout(Path(recipe.workdir))
    for spec in [recipe.target, *recipe.sources]:
        actual = _parquet_bytes(layout.extract(spec.name))
        planned = plan["models"][spec.name]["extract_bytes"]
        assert abs(planned - actual) <= 0.10 * actual, (spec.name, planned, actual)
    actual = _parquet_bytes(layout.aligned)
    assert abs(plan["align"]["bytes"] - actual) <= 0.10 * actual, (plan["align"]["bytes"], actual)
    assert {r["model"] for r in result.eval_rows} == {"target (before)", "gpt", "neox", "minc"}

    # `fusekit run` on the same recipe finds every stage complete and ends with the eval table.
    from typer.testing import CliRunner

    from fusekit.cli import app

    done = CliRunner().invoke(app, ["run", str(tiny_recipe), "--no-progress"], terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "held-out mean CE" in done.output and "minc" in done.output and "target (before)" in done.output


@pytest.fixture(scope="module")
def uneven_corpus(tmp_path_factory, tokenizers_by_kind):
    """2,000 texts from 3 to 20,000 characters (log-uniform), prose and code, as JSONL and as Parquet."""
    import numpy as np

    import corpus_files as cf

    big = "\n".join(zoo.stdlib_texts("prose", limit=60) + zoo.stdlib_texts("code", limit=60))
    rng = np.random.default_rng(1)
    docs = []
    for _ in range(2000):
        n = int(np.exp(rng.uniform(np.log(3), np.log(20_000))))
        start = int(rng.integers(0, len(big) - n))
        docs.append(big[start : start + n])
    root = tmp_path_factory.mktemp("uneven")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cf.write_parquet(root / "c.parquet", docs, row_group_size=50)
    tok = tokenizers_by_kind["bpe"]
    exact = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs if t.strip())  # + EOS per text
    return root, tok, exact


@pytest.mark.parametrize("name", ["c.jsonl", "c.parquet"])
def test_sampled_token_count_is_within_5_percent_of_the_exact_count(uneven_corpus, name):
    from fusekit.corpus.counts import count_corpus

    root, tok, exact = uneven_corpus
    counts = count_corpus(root / name, "text", {"bpe": (tok, 64)}, append_eos=True, exact_bytes=0)
    assert counts.method == "sampled" and counts.draws < 2000
    assert abs(counts.tokens["bpe"] - exact) <= 0.05 * exact, (counts.tokens["bpe"], exact)
    assert counts.error <= 0.02 and "±" in counts.describe()
