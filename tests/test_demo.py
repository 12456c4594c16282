"""`fusekit demo --quick` end to end: offline assets → extract → align → train ×3 → eval → results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusekit.demo.corpora import DOMAINS, split_domain


def test_domain_splits_are_disjoint_and_within_budget():
    for domain in DOMAINS:
        split = split_domain(domain, 20_000, 10_000, 5_000)
        parts = [split.pretrain, split.fusion, split.heldout]
        seen = [set(p) for p in parts]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
        # Each part stops at the first piece that reaches its budget.
        for part, budget in zip(parts, (20_000, 10_000, 5_000)):
            assert budget <= sum(map(len, part)) < budget + max(map(len, part)) + 1
    with pytest.raises(ValueError, match="empty"):
        split_domain("prose", 1000, 1000, 0)


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_resumes_to_the_same_results(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fusekit.cli", "demo", "--quick", "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    names = ["target (before)", "code-expert", "prose-expert", "api-expert", "fusellm-mince", "fusellm-avgce", "clm-only"]
    assert {(r["model"], r["dataset"]) for r in results["eval"]} == {(m, d) for m in names for d in DOMAINS}
    for row in results["eval"]:
        # nats/char and nats/token describe the same total loss.
        assert abs(row["nats_per_char"] * row["chars"] - row["mean_ce"] * row["tokens"]) < 1e-6 * row["mean_ce"] * row["tokens"]
    assert set(results["ce_per_token"]) == {"target (before)", "fusellm-mince", "fusellm-avgce", "clm-only"}
    assert set(results["nats_per_char"]) == set(names)
    assert set(results["claim"]["average_ce"]) == {"before", "clm", "min_ce", "avg_ce"}
    # Continual training on the fusion corpus must help the briefly pre-trained target at all.
    assert results["claim"]["average_ce"]["clm"] < results["claim"]["average_ce"]["before"]

    # The downstream table: every model on every demo task, through lm-eval (fusekit eval --tasks's path).
    if importlib.util.find_spec("lm_eval") is not None:
        tasks = ["demo_next_line_code", "demo_next_line_prose", "demo_next_line_api", "demo_complete_code"]
        assert {(r["model"], r["task"]) for r in results["tasks"]} == {(m, t) for m in names for t in tasks}
        for r in results["tasks"]:
            assert 0.0 <= r["value"] <= 1.0 and r["samples"] == (20 if r["task"] == "demo_complete_code" else 40)
        assert set(results["downstream"]) == set(names)
        assert set(results["downstream"]["clm-only"]) == {"next line · code", "next line · prose", "next line · api", "code completion"}
        assert (out / "run" / "eval" / "fusellm-mince.json").is_file()
        card = (out / "run" / "train" / "fusellm-mince" / "README.md").read_text()
        assert "## Evaluation" in card and "demo_next_line_code acc" in card and "model-index:" in card

    report = results["align_report"]
    assert [s["model"] for s in report["sources"]] == ["code-expert", "prose-expert", "api-expert"]
    assert all(0 < s["carried_share"] <= 1 for s in report["sources"])
    assert (out / "results.png").stat().st_size > 10_000
    assert (out / "run" / "aligned" / "report.json").is_file()
    assert "fusellm-mince" in (out / "recipe.yaml").read_text()

    # The run is resumable: a second invocation skips every finished stage and reproduces the numbers.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["eval"] == results["eval"]


def test_the_demo_recipe_runs_with_fusekit_run(tmp_path):
    """The recipe the demo writes is an ordinary recipe (the schema accepts it)."""
    from fusekit.demo import config as presets
    from fusekit.demo.assets import DemoAssets
    from fusekit.demo.run import demo_recipe
    from fusekit.recipe import Recipe

    cfg = presets.quick()
    paths = {n: tmp_path / n for n in ("fusion.jsonl", "t", "a")}
    assets = DemoAssets(fusion_corpus=paths["fusion.jsonl"], heldout={"code": paths["fusion.jsonl"]}, target=paths["t"], experts={"a": paths["a"]})
    recipe = demo_recipe(cfg, assets, tmp_path / "run", real=None)
    again = Recipe.model_validate(recipe.model_dump(mode="json"))
    assert [v.lam for v in again.train.variants] == [cfg.lam, cfg.lam, 1.0]
    assert again.extract.max_length == cfg.window == again.train.max_length
