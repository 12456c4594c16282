"""fusekit's merges against mergekit's on the same tiny models (skipped where mergekit is not installed).

mergekit pins nothing fusekit needs, but pulls in datasets/peft/pandas; to run this file without touching
the main environment: python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install mergekit &&
/tmp/mk/bin/python -m pytest tests/merge/test_merge_mergekit.py. DARE's and DELLA's random masks cannot match
mergekit's (different generators): they are compared at density 1, and by the rule both apply whatever the
mask — with one model and `rescale`, each tensor's task vector keeps its L1 norm (times the weight).
The second half runs the same YAML (gradients, filters, slices, every method) through both tools.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("mergekit")

from test_merge_models import build_family  # noqa: E402

import fusekit  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family_mk"))


def run_mergekit(config: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True))
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


CASES = [
    ("linear", {"weight": [0.3, 0.9]}, {}, dict(weights=[0.3, 0.9])),
    ("task_arithmetic", {"weight": [0.6, 0.5]}, {"lambda": 0.8}, dict(weights=[0.6, 0.5], lam=0.8)),
    ("ties", {"weight": [1.0, 2.0], "density": [0.3, 0.5]}, {}, dict(weights=[1.0, 2.0], density=[0.3, 0.5])),
    ("ties", {"weight": [1.0, 1.0], "density": [0.4, 0.4]}, {"normalize": False}, dict(density=0.4, normalize=False)),
    ("dare_linear", {"weight": [0.5, 0.7], "density": [1.0, 1.0]}, {}, dict(weights=[0.5, 0.7], density=1.0)),
    ("dare_ties", {"weight": [0.5, 0.7], "density": [1.0, 1.0]}, {}, dict(weights=[0.5, 0.7], density=1.0)),
]


@pytest.mark.parametrize(("method", "per_model", "shared", "ours"), CASES)
def test_matches_mergekit(method, per_model, shared, ours, family, tmp_path):
    # Not "trained": weight decay on its unused embedding rows leaves equal magnitudes at TIES' threshold,
    # where the two tools break ties differently (both keep exactly k).
    names = ["layer0", "noisy"]
    config = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "dtype": "float32",
        "models": [
            {"model": str(family[n]), "parameters": {k: v[j] for k, v in per_model.items()}} for j, n in enumerate(names)
        ],
    }
    if shared:
        config["parameters"] = shared
    if method == "linear":  # mergekit would average the base in as a third input
        del config["base_model"]
    theirs = run_mergekit(config, tmp_path / "mk")
    out = fusekit.run_merge(family["base"], [family[n] for n in names], tmp_path / "fk", method=method, progress=False, **ours).out
    mine = load_file(out / "model.safetensors")
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


def test_slerp_matches_mergekit(family, tmp_path):
    a, b = str(family["trained"]), str(family["noisy"])
    config = {"merge_method": "slerp", "base_model": a, "dtype": "float32", "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.3}}
    theirs = run_mergekit(config, tmp_path / "mk")
    # mergekit's t = 0 is its base; fusekit's is the first model, or the base when the base is one of the two.
    for order in ([a, b], [b, a]):
        out = fusekit.run_merge(a, order, tmp_path / f"fk{order[0] == b}", method="slerp", t=0.3, progress=False).out
        mine = load_file(out / "model.safetensors")
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


def test_mergekit_yaml_runs_unchanged_in_fusekit(family, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["trained"]), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(family["noisy"]), "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    theirs = run_mergekit(config, tmp_path / "mk")
    mine = load_file(fusekit.run_merge(config=path, out=tmp_path / "fk", progress=False).out / "model.safetensors")
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


def _mk_and_fk(config: dict, tmp_path) -> tuple[dict, dict]:
    theirs = run_mergekit(config, tmp_path / "mk")
    out = fusekit.run_merge(config=config, out=tmp_path / "fk", progress=False).out
    return load_file(out / "model.safetensors"), theirs


def _models(family, names, params):
    return [{"model": str(family[n]), "parameters": p} for n, p in zip(names, params)]


YAML_CASES = {
    "sce": lambda f: {"merge_method": "sce", "base_model": str(f["base"]), "parameters": {"select_topk": 0.3},
                      "models": _models(f, ["layer0", "trained", "noisy"], [{}, {}, {}])},
    "sce_all": lambda f: {"merge_method": "sce", "base_model": str(f["base"]),
                          "models": _models(f, ["trained", "noisy"], [{}, {}])},
    "breadcrumbs": lambda f: {"merge_method": "breadcrumbs", "base_model": str(f["base"]),
                              "models": _models(f, ["layer0", "noisy"], [{"weight": 0.7, "density": 0.6, "gamma": 0.05},
                                                                         {"weight": 0.4, "density": 0.5}])},
    "breadcrumbs_ties": lambda f: {"merge_method": "breadcrumbs_ties", "base_model": str(f["base"]),
                                   "models": _models(f, ["layer0", "noisy"], [{"weight": 1.0, "density": 0.6},
                                                                              {"weight": 0.5, "density": 0.5}])},
    "model_stock": lambda f: {"merge_method": "model_stock", "base_model": str(f["base"]),
                              "models": _models(f, ["layer0", "trained", "noisy"], [{}, {}, {}])},
    "model_stock_rows": lambda f: {"merge_method": "model_stock", "base_model": str(f["base"]),
                                   "parameters": {"filter_wise": True},
                                   "models": _models(f, ["layer0", "trained", "noisy"], [{}, {}, {}])},
    "nuslerp": lambda f: {"merge_method": "nuslerp", "base_model": str(f["base"]),
                          "models": _models(f, ["trained", "noisy"], [{"weight": 0.3}, {"weight": 0.9}])},
    "nuslerp_rows_no_base": lambda f: {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                       "models": _models(f, ["trained", "noisy"], [{"weight": 1.0}, {"weight": 2.0}])},
    "della_dense": lambda f: {"merge_method": "della", "base_model": str(f["base"]),
                              "models": _models(f, ["trained", "noisy"], [{"weight": 1.0, "density": 1.0},
                                                                          {"weight": 0.5, "density": 1.0}])},
    "gradients_filters": lambda f: {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
                                    "parameters": {"lambda": [{"filter": "self_attn", "value": 2.0}, {"value": 1.0}]},
                                    "models": _models(f, ["trained", "noisy"], [
                                        {"weight": [0.2, 1.0]},
                                        {"weight": [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 0.0]}]}])},
    "fusechat_slerp": lambda f: {"merge_method": "slerp", "base_model": str(f["base"]),
                                 "slices": [{"sources": [{"model": str(f["base"]), "layer_range": [0, 2]},
                                                         {"model": str(f["noisy"]), "layer_range": [0, 2]}]}],
                                 "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]},
                                                      {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]}},
    "slices": lambda f: {"merge_method": "ties", "base_model": str(f["base"]), "slices": [
        {"sources": [{"model": str(f["trained"]), "layer_range": [0, 1], "parameters": {"weight": 0.3, "density": 0.5}},
                     {"model": str(f["base"]), "layer_range": [0, 1]},
                     {"model": str(f["noisy"]), "layer_range": [0, 1]}], "parameters": {"weight": 0.7, "density": 0.4}},
        {"sources": [{"model": str(f["trained"]), "layer_range": [1, 2]}, {"model": str(f["base"]), "layer_range": [1, 2]},
                     {"model": str(f["noisy"]), "layer_range": [1, 2], "parameters": {"weight": 2.0}}]}],
        "parameters": {"weight": 1.0, "density": 0.6}},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_same_yaml_same_merge(case, family, tmp_path):
    config = {**YAML_CASES[case](family), "dtype": "float32"}
    mine, theirs = _mk_and_fk(config, tmp_path)
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drops_keep_the_l1_norm_like_mergekit(method, family, tmp_path):
    config = {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32",
              "models": _models(family, ["noisy"], [{"weight": 0.5, "density": 0.4}])}  # fmt: skip
    mine, theirs = _mk_and_fk(config, tmp_path)
    base = load_file(family["base"] / "model.safetensors")
    for k in mine:
        a, b = (mine[k] - base[k]).double(), (theirs[k] - base[k]).double()
        assert float(a.abs().sum()) == pytest.approx(float(b.abs().sum()), rel=1e-4, abs=1e-6), k
        assert not torch.equal(a, b) or a.numel() < 4  # different masks, same rule
