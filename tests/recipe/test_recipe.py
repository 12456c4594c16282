"""The recipe schema: unknown keys and missing models are rejected with messages that say what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusekit.fusechat import load_fusechat
from fusekit.recipe import RecipeError, load_recipe


def _write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def valid(tmp_path: Path) -> dict:
    for d in ("target", "s1", "s2"):
        (tmp_path / d).mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    return {
        "workdir": "work",
        "target": {"name": "t", "model": "target"},
        "sources": [{"name": "a", "model": "s1"}, {"name": "b", "model": "s2"}],
        "corpus": {"name": "c", "data": "corpus.jsonl"},
        "eval": [{"name": "c", "data": "corpus.jsonl"}],
    }


def test_a_valid_recipe_resolves_paths_relative_to_its_file(tmp_path, valid):
    recipe = load_recipe(_write(tmp_path, valid))
    assert recipe.workdir == str(tmp_path / "work")
    assert recipe.target.model == str(tmp_path / "target")
    assert [s.model for s in recipe.sources] == [str(tmp_path / "s1"), str(tmp_path / "s2")]
    assert [v.name for v in recipe.train.variants] == ["fusellm-mince", "fusellm-avgce", "clm-only"]
    assert recipe.train.variants[2].lam == 1.0  # the CLM-only baseline


@pytest.mark.parametrize(
    "patch, where",
    [
        ({"sourcez": []}, "sourcez"),
        ({"train": {"lamda": 0.5}}, "train.lamda"),
        ({"extract": {"top_k": 10, "topk": 5}}, "extract.topk"),
    ],
)
def test_unknown_keys_are_named(tmp_path, valid, patch, where):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, {**valid, **patch}))
    assert f"{where}: unknown key" in str(err.value)


def test_missing_models_and_data_are_all_listed(tmp_path, valid):
    valid["sources"][1]["model"] = "nowhere"
    valid["corpus"]["data"] = "missing.jsonl"
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, valid))
    message = str(err.value)
    assert "model 'b'" in message and "nowhere does not exist" in message
    assert "data 'c'" in message and "missing.jsonl does not exist" in message


def test_bad_values_and_duplicate_names(tmp_path, valid):
    with pytest.raises(RecipeError, match=r"train\.variants\.0\.lam: Input should be less than or equal to 1"):
        load_recipe(_write(tmp_path, {**valid, "train": {"variants": [{"name": "x", "lam": 1.5}]}}))
    with pytest.raises(RecipeError, match="distinct"):
        load_recipe(_write(tmp_path, {**valid, "sources": [{"name": "t", "model": "s1"}]}))
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe(tmp_path / "absent.yaml")


def test_fusechat_config_shares_the_schema(tmp_path, valid):
    config = {
        "workdir": "fc",
        "pivot": valid["target"],
        "sources": valid["sources"],
        "corpus": valid["corpus"],
        "merge": {"method": "varm"},
    }
    loaded = load_fusechat(_write(tmp_path, config, "fusechat.yaml"))
    assert loaded.pivot.model == str(tmp_path / "target")
    assert loaded.as_recipe().train.variants[0].lam == 0.9
    with pytest.raises(RecipeError, match="merge.method"):
        load_fusechat(_write(tmp_path, {**config, "merge": {"method": "average"}}, "bad.yaml"))
    with pytest.raises(RecipeError, match="slerp merges exactly two"):
        load_fusechat(_write(tmp_path, {**config, "merge": {"method": "slerp"}}, "bad2.yaml"))


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, valid):
    path = _write(tmp_path, {**valid, "oops": 1})
    done = subprocess.run([sys.executable, "-m", "fusekit.cli", "plan", str(path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "oops: unknown key" in done.stderr
    assert "Traceback" not in done.stderr
