"""mergekit YAML as-is: settings (scalars, gradients, filtered lists), slices, base and tokenizer rules, run on
tiny real models and checked against the formulas applied here in float64 with the values worked out by hand."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from fusekit.merge import MergeError, MergeWarning, load_config
from fusekit.merge.params import ParamSource, SliceSpec, evaluate_setting, layer_index
from test_merge_models import build_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family_cfg"))


@pytest.fixture(scope="module")
def weights(family):
    return {name: {k: v.double() for k, v in load_file(path / "model.safetensors").items()} for name, path in family.items()}


def write(tmp_path, config: dict, name="merge.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def merged(out) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(out / "model.safetensors").items()}


# --- settings ----------------------------------------------------------------------------------------


def test_evaluate_setting_by_hand():
    assert evaluate_setting("x", 0.3, 0.7) == 0.3
    # gradient (0, 1, .5): t = .25 → position .5 → halfway between 0 and 1; t = .75 → between 1 and .5
    assert evaluate_setting("x", [0, 1, 0.5], 0.25) == pytest.approx(0.5)
    assert evaluate_setting("x", [0, 1, 0.5], 0.75) == pytest.approx(0.75)
    assert evaluate_setting("x", [0, 1, 0.5], 1.0) == pytest.approx(0.5)
    assert evaluate_setting("x", [True, False], 0.9) is True  # non-numbers: the entry at ⌊t·(n−1)⌋
    cond = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}]
    assert evaluate_setting("model.layers.1.self_attn.q_proj.weight", cond, 0.5) == pytest.approx(0.5)
    assert evaluate_setting("model.layers.1.mlp.up_proj.weight", cond, 0.5) == 0.2
    assert evaluate_setting("model.norm.weight", cond, 0.5) is None  # nothing matches: falls through
    assert evaluate_setting("model.norm.weight", [*cond, {"value": 7}], 0.5) == 7


def test_positions_and_lookup_order():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("lm_head.weight") is None
    src = ParamSource(
        model_parameters=[{"weight": [0.0, 1.0]}, {}],
        parameters={"weight": 5.0, "normalize": [{"filter": "mlp", "value": True}]},
        overrides={"lambda": 3.0},
        model_overrides=[{}, {"density": 0.4}],
    )
    names = ({"normalize": False, "lambda": 1.0}, {"weight": 1.0, "density": None})
    # 5 layers: layer 2 sits at t = 2/4; outside the layers t = 0
    g, per = src.resolve("model.layers.2.mlp.w", 5, *names)
    assert g == {"normalize": True, "lambda": 3.0}
    assert per[0] == {"weight": 0.5, "density": None} and per[1] == {"weight": 5.0, "density": 0.4}
    g, per = src.resolve("lm_head.weight", 5, *names)
    assert g["normalize"] is False and per[0]["weight"] == 0.0
    # slices: t restarts in each slice; embeddings read the first slice, the head the last
    sl = ParamSource(
        model_parameters=[{}],
        slices=[SliceSpec(0, 3, {"weight": [1.0, 3.0]}, [{}]), SliceSpec(3, 5, {}, [{"weight": [10.0, 20.0]}])],
    )
    w = lambda name: sl.resolve(name, 5, {}, {"weight": 1.0})[1][0]["weight"]  # noqa: E731
    assert [w(f"model.layers.{i}.x") for i in range(5)] == pytest.approx([1.0, 2.0, 3.0, 10.0, 20.0])
    assert w("model.embed_tokens.weight") == 1.0 and w("lm_head.weight") == 10.0


# --- YAML on real tiny models ------------------------------------------------------------------------


def t_of(name: str) -> float:
    i = layer_index(name)  # the family has 2 layers: layer 0 at t = 0, layer 1 at t = 1
    return 0.0 if i is None else float(i)


def test_gradients_and_filters_per_tensor(family, weights, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["trained"]), "parameters": {"weight": [0.2, 1.0]}},
            {"model": str(family["noisy"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 0.0]}]}},
        ],
        "parameters": {"lambda": [{"filter": "self_attn", "value": 2.0}, {"value": 1.0}]},
        "dtype": "float32",
    }
    out = fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False).out
    got = merged(out)
    b, d1, d2 = weights["base"], weights["trained"], weights["noisy"]
    for name in b:
        t = t_of(name)
        w1 = 0.2 + 0.8 * t
        w2 = 0.5 if "mlp" in name else 1.0 - t
        lam = 2.0 if "self_attn" in name else 1.0
        expect = b[name] + lam * (w1 * (d1[name] - b[name]) + w2 * (d2[name] - b[name]))
        torch.testing.assert_close(got[name], expect, rtol=1e-5, atol=1e-6, msg=name)
    record = json.loads((out / "fusekit_merge.json").read_text())
    assert record["model_parameters"][0]["weight"] == [0.2, 1.0]


def _slerp64(t, a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    dot = float(torch.dot(a / (na if na > 1e-8 else 1), b / (nb if nb > 1e-8 else 1)))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_fusechat_style_slerp_with_filtered_gradients(family, weights, tmp_path):
    # FuseChat's published configs: slerp between the pivot and a target, t per filter and per layer.
    config = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "slices": [{"sources": [{"model": str(family["base"]), "layer_range": [0, 2]},
                                {"model": str(family["noisy"]), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]},
        "dtype": "float32",
    }  # fmt: skip
    got = merged(fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False).out)
    b, m = weights["base"], weights["noisy"]
    for name in b:
        pos = t_of(name)
        t = pos if "self_attn" in name else (1 - pos if "mlp" in name else 0.3)
        expect = _slerp64(t, b[name], m[name]).reshape(b[name].shape)
        torch.testing.assert_close(got[name], expect, rtol=1e-5, atol=1e-6, msg=name)


def test_slices_that_keep_the_layers_in_place_carry_their_own_parameters(family, weights, tmp_path):
    src = lambda m, r, **p: {"model": str(family[m]), "layer_range": r, **({"parameters": p} if p else {})}  # noqa: E731
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "slices": [
            {"sources": [src("trained", [0, 1], weight=0.3), src("noisy", [0, 1])], "parameters": {"weight": 0.7}},
            {"sources": [src("trained", [1, 2]), src("noisy", [1, 2], weight=2.0)]},
        ],
        "parameters": {"weight": 1.0},
    }
    got = merged(fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False).out)
    b, d1, d2 = weights["base"], weights["trained"], weights["noisy"]
    for name in b:
        first = layer_index(name) == 0 or "embed" in name  # embeddings are read with the first slice
        w1, w2 = (0.3, 0.7) if first else (1.0, 2.0)
        expect = b[name] + w1 * (d1[name] - b[name]) + w2 * (d2[name] - b[name])
        torch.testing.assert_close(got[name], expect, rtol=1e-5, atol=1e-6, msg=name)

    stacked = dict(config, slices=[{"sources": [src("trained", [0, 2]), src("noisy", [0, 2])]},
                                   {"sources": [src("trained", [0, 2]), src("noisy", [0, 2])]}])  # fmt: skip
    with pytest.raises(MergeError, match="frankenmerges"):
        fusekit.run_merge(config=write(tmp_path, stacked, "s.yml"), out=tmp_path / "s", progress=False).out
    short = dict(config, slices=[{"sources": [src("trained", [0, 1]), src("noisy", [0, 1])]}])
    with pytest.raises(MergeError, match="2 layers"):
        fusekit.run_merge(config=write(tmp_path, short, "h.yml"), out=tmp_path / "h", progress=False).out
    assert not (tmp_path / "h").exists() or not any((tmp_path / "h").glob("*.safetensors"))


def test_base_rules_as_mergekit(family, tmp_path):
    models = [{"model": str(family[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("trained", "noisy")]
    ties = {"merge_method": "ties", "base_model": str(family["base"]), "models": models}
    a = fusekit.run_merge(config=write(tmp_path, ties, "a.yml"), out=tmp_path / "a", progress=False).out
    # the base listed among the models is read as the base only (mergekit skips its zero task vector)
    listed = dict(ties, models=[{"model": str(family["base"]), "parameters": {"weight": 5.0}}, *models])
    b = fusekit.run_merge(config=write(tmp_path, listed, "b.yml"), out=tmp_path / "b", progress=False).out
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    linear = {"merge_method": "linear", "base_model": str(family["base"]), "models": models}
    with pytest.raises(MergeError, match="averages base_model in"):
        fusekit.run_merge(config=write(tmp_path, linear, "l.yml"), out=tmp_path / "l", progress=False).out
    # linear without a base: the first model supplies config and tokenizer
    lin = {"merge_method": "linear", "models": [{"model": str(family["trained"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(family["noisy"]), "parameters": {"weight": 3.0}}]}  # fmt: skip
    got = merged(fusekit.run_merge(config=write(tmp_path, lin, "n.yml"), out=tmp_path / "n", progress=False).out)
    t1, t2 = (load_file(family[n] / "model.safetensors") for n in ("trained", "noisy"))
    for k in got:
        torch.testing.assert_close(got[k], (t1[k].double() + 3 * t2[k].double()) / 4, rtol=1e-5, atol=1e-6)


def test_tokenizer_source(family, tmp_path):
    other = tmp_path / "noisy_tok"
    shutil.copytree(family["noisy"], other)
    tok_cfg = json.loads((other / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    config = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
              "models": [str(family["trained"]), str(other)], "tokenizer_source": str(other)}  # fmt: skip
    out = fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False).out
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    # another vocabulary: refused before anything is written
    foreign = tmp_path / "foreign"
    shutil.copytree(family["noisy"], foreign)
    tok = zoo.train_tokenizer("bpe", zoo.stdlib_texts("code", limit=30), vocab_size=300)
    tok.save_pretrained(foreign)
    bad = dict(config, models=[str(family["trained"]), str(foreign)], tokenizer_source="union")
    with pytest.raises(MergeError, match="another vocabulary"):
        fusekit.run_merge(config=write(tmp_path, bad, "bad.yml"), out=tmp_path / "bad", progress=False).out
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"modules": {"decoder": {}}}, "modules"),
        ({"tokenizer": {"source": "union"}}, "tokenizer"),
        ({"chat_template": "chatml"}, "chat_template"),
        ({"parameters": {"weight": {"a": 1}}}, "expected a number"),
        ({"slices": []}, "slices"),
    ],
)
def test_unsupported_config_is_refused_in_one_line(extra, message, tmp_path):
    path = write(tmp_path, {"merge_method": "ties", "base_model": "b", "models": ["m"], **extra})
    with pytest.raises(MergeError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_parameters_a_method_does_not_read_warn_and_explicit_options_win(family, weights, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
              "models": [{"model": str(family["noisy"]), "parameters": {"weight": 0.5, "select_topk": 0.1}}]}  # fmt: skip
    with pytest.warns(MergeWarning, match="select_topk"):
        out = fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False, weights=[2.0]).out
    got = merged(out)
    b, m = weights["base"], weights["noisy"]
    for k in got:
        torch.testing.assert_close(got[k], b[k] + 2.0 * (m[k] - b[k]), rtol=1e-5, atol=1e-6)


def test_cli_runs_a_mergekit_sce_yaml(family, tmp_path):
    config = {"merge_method": "sce", "base_model": str(family["base"]),
              "models": [{"model": str(family[n])} for n in ("layer0", "trained", "noisy")],
              "parameters": {"select_topk": 0.5, "normalize": True}, "dtype": "bfloat16"}  # fmt: skip
    code = "import sys; from fusekit.cli import main; sys.argv = ['fusekit', *sys.argv[1:]]; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = ["merge", "--config", str(write(tmp_path, config)), "--out", str(tmp_path / "out"), "--json"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "sce"
    assert proc.stderr.strip() == "warning: method sce reads no normalize: ignored (as mergekit does)"
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "out" / "model.safetensors").values() if v.is_floating_point())


def test_varm_is_reachable_from_a_mergekit_yaml(family, weights, tmp_path):
    config = {"merge_method": "varm", "base_model": str(family["base"]),
              "models": [{"model": str(family["layer0"])}, {"model": str(family["noisy"])}]}  # fmt: skip
    got = merged(fusekit.run_merge(config=write(tmp_path, config), out=tmp_path / "out", progress=False).out)
    b, m1, m2 = weights["base"], weights["layer0"], weights["noisy"]
    for name in b:
        c1, c2 = float(((m1[name] - b[name]) ** 2).mean()), float(((m2[name] - b[name]) ** 2).mean())
        w1 = c1 / (c1 + c2) if c1 + c2 > 0 else 0.5
        torch.testing.assert_close(got[name], w1 * m1[name] + (1 - w1) * m2[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "out" / "varm_weights.json").is_file()
