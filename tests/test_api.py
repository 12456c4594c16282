"""The public API: plain functions with real signatures, one result type, the old spellings warn."""

from __future__ import annotations

import importlib.util
import inspect
import json
import types
import warnings

import numpy as np
import pytest

import fusekit
from fusekit import zoo
from fusekit.api import StageResult

RUN = ["run_extract", "run_align", "run_train", "run_eval", "run_merge", "run_implicit", "run_recipe", "run_fusechat", "run_plan", "run_demo", "run_distill"]


def test_entry_points_are_plain_functions_with_real_signatures():
    for name in RUN:
        fn = getattr(fusekit, name)
        assert inspect.isfunction(fn), name
        assert inspect.signature(fn).return_annotation in ("StageResult", StageResult), name
        assert name in fusekit.__all__
    # One argument order across the merge functions: base, models, out.
    from fusekit.merge import merge_models

    for fn in (fusekit.run_merge, merge_models):
        assert list(inspect.signature(fn).parameters)[:3] == ["base", "models", "out"]


def test_no_public_name_is_both_a_package_and_a_function():
    for name in fusekit.__all__:
        is_package = importlib.util.find_spec(f"fusekit.{name}") is not None
        value = getattr(fusekit, name)
        assert not (is_package and isinstance(value, types.FunctionType)), name
    for package in ("extract", "train", "merge"):
        assert isinstance(getattr(fusekit, package), types.ModuleType)


@pytest.mark.parametrize("old", ["align_store", "evaluate", "implicit_fusion"])
def test_old_top_level_names_still_resolve_and_warn(old):
    with pytest.warns(DeprecationWarning, match=f"fusekit.{old} is deprecated"):
        fn = getattr(fusekit, old)
        with pytest.raises(Exception):  # noqa: B017  (any error: only the warning is under test)
            fn()


def test_calling_a_stage_package_warns_and_keeps_its_old_behaviour(tmp_path):
    import fusekit.extract  # noqa: F401  (the package, bound as fusekit.extract)

    with pytest.warns(DeprecationWarning, match="use fusekit.run_extract"):
        with pytest.raises(fusekit.extract.CorpusError):
            fusekit.extract("no-model", tmp_path / "missing.txt", tmp_path / "out")
    with pytest.warns(DeprecationWarning, match="run_merge"):
        with pytest.raises(fusekit.merge.MergeError):
            fusekit.merge.merge(tmp_path / "none", [tmp_path / "none"], "linear", tmp_path / "o")


def test_stage_result_is_a_path_only_when_the_stage_wrote_one(tmp_path):
    import os

    assert os.fspath(StageResult("extract", tmp_path)) == str(tmp_path)
    with pytest.raises(TypeError, match="eval stage wrote no folder"):
        os.fspath(StageResult("eval", None, {"mean_ce": 1.0}))


@pytest.fixture(scope="module")
def two_models(tokenizers_by_kind, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-models")
    return (
        zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], root / "target", hidden=32, context=64, seed=1),
        zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "source", hidden=32, context=64, seed=2),
    )


def test_stages_chain_through_their_results(two_models, corpus_texts, tmp_path):
    target, source = two_models
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(t.replace("\n", " ")[:160] for t in corpus_texts[:4]) + "\n")
    opts = dict(top_k=4, max_length=32, progress=False)
    x_target = fusekit.run_extract(target, corpus, tmp_path / "x-target", **opts)
    x_source = fusekit.run_extract(source, corpus, tmp_path / "x-source", **opts)
    assert (x_target.stage, x_target.out) == ("extract", tmp_path / "x-target")
    assert x_target.report["k"] == 4 and x_target.report["n_texts"] == 4

    aligned = fusekit.run_align(x_target, [x_source], tmp_path / "aligned", vocab_map_cache=tmp_path / "cache", progress=False)
    assert aligned.out == tmp_path / "aligned"
    json.dumps(aligned.report)  # JSON-ready

    trained = fusekit.run_train(target, aligned, tmp_path / "trained", max_steps=1, batch_size=2, progress=False)
    assert trained.out == tmp_path / "trained" and (trained.out / "config.json").is_file()
    assert trained.report  # fusekit_train.json

    by_path = fusekit.run_eval(trained, corpus, max_length=32, progress=False)
    assert by_path.out is None and by_path.report["mean_ce"] > 0

    # A loaded model (and a tokenizer given by path) scores the same as the folder it came from.
    from fusekit.models.load import load_model

    loaded = fusekit.run_eval(load_model(trained.out), corpus, tokenizer=trained.out, max_length=32, progress=False)
    assert loaded.report["mean_ce"] == pytest.approx(by_path.report["mean_ce"], rel=1e-6)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        fusekit.run_eval(load_model(trained.out), corpus)


def test_merge_result_has_the_shared_shape(two_models, tmp_path):
    from safetensors.numpy import load_file

    target, _ = two_models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # same-model merge: nothing to warn about that matters here
        result = fusekit.run_merge(target, [target, target], tmp_path / "m", method="linear", progress=False, plot=False)
    assert (result.stage, result.out) == ("merge", tmp_path / "m")
    assert result.report["method"] == "linear" and result.report["tensors"] > 0
    merged = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))
    original = load_file(str(target / "model.safetensors"))
    for name, value in merged.items():  # the mean of two copies of one model is that model
        np.testing.assert_allclose(value, original[name], rtol=1e-6, atol=1e-7)


def test_transfer_takes_tokenizers_by_path_or_object(tokenizers_by_kind, tmp_path):
    from fusekit.models.load import load_tokenizer

    paths = {}
    for kind in ("bpe", "unigram"):
        paths[kind] = tmp_path / f"{kind}.json"
        tokenizers_by_kind[kind].backend_tokenizer.save(str(paths[kind]))
    text = "The quick brown fox jumps over the lazy dog."
    src = load_tokenizer(paths["bpe"])
    src_ids = np.asarray(src(text, add_special_tokens=False)["input_ids"])
    n = len(src_ids)
    ids = np.stack([np.append(src_ids[1:], src_ids[0]), np.full(n, 5), np.full(n, 6)], axis=1)  # row i: token i+1 first
    logp = np.log(np.tile(np.array([0.8, 0.1, 0.1], dtype=np.float32), (n, 1)))
    by_object = fusekit.transfer(text, src, load_tokenizer(paths["unigram"]), ids, logp)
    by_path = fusekit.transfer(text, paths["bpe"], str(paths["unigram"]), ids, logp)
    np.testing.assert_array_equal(by_object.ids, by_path.ids)
    np.testing.assert_array_equal(by_object.probs, by_path.probs)
    assert by_path.carried.any()
