"""Tiny real models (trained tokenizer, llama config) merged, reloaded with from_pretrained, and checked
against the merge formulas applied here in float64 to the reloaded inputs' weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import fusekit
from fusekit import zoo
from fusekit.merge import MergeError, load_config, merge_models

IDS = torch.tensor([[1, 5, 9, 40, 77, 3, 120, 250]])


def _state(path) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def build_family(root: Path) -> dict[str, Path]:
    """A base and three fine-tuned variants: layer 0 perturbed, two real AdamW steps, everything perturbed."""
    texts = zoo.stdlib_texts("prose", limit=30)
    tok = zoo.train_tokenizer("bpe", texts, vocab_size=300)
    base = zoo.build_tiny_model("llama", tok, root / "base", hidden=32, layers=2, heads=2, context=128)
    paths = {"base": base}

    def save(model, name):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name

    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".layers.0." in n:
                p.add_(0.02 * torch.randn_like(p))
    save(m, "layer0")

    m = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    batch = tok(texts[:4], return_tensors="pt", truncation=True, max_length=64, padding=True)
    for _ in range(2):
        loss = m(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    save(m, "trained")

    m = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save(m, "noisy")
    return paths


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def states(family):
    return {name: _state(path) for name, path in family.items()}


# --- float64 references of the formulas ------------------------------------------------------------


def ref_varm(b, ms):
    ch = [((m - b) ** 2).mean() for m in ms]
    w = [1 / len(ms)] * len(ms) if sum(ch) == 0 else [c / sum(ch) for c in ch]
    return sum(wj * m for wj, m in zip(w, ms)), w


def ref_trim(d, density):
    k = max(1, int(density * d.size))
    keep = np.argsort(-np.abs(d).reshape(-1), kind="stable")[:k]
    out = np.zeros(d.size)
    out[keep] = d.reshape(-1)[keep]
    return out.reshape(d.shape)


def ref_ties(b, ms, weights, density):
    taus = [w * ref_trim(m - b, density) for m, w in zip(ms, weights)]
    sign = np.where(sum(taus) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == sign for t in taus]
    num = sum(t * a for t, a in zip(taus, agree))
    den = sum(w * a for w, a in zip(weights, agree))
    return b + num / np.where(den == 0, 1, den)


def ref_slerp(t, a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.clip((a / na * b / nb).sum(), -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(dot)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


CASES = {
    "varm": (dict(), lambda b, ms: ref_varm(b, ms)[0]),
    "linear": (dict(weights=[1.0, 3.0]), lambda b, ms: (ms[0] + 3 * ms[1]) / 4),
    "task_arithmetic": (dict(weights=[0.7, 0.5], lam=0.8), lambda b, ms: b + 0.8 * (0.7 * (ms[0] - b) + 0.5 * (ms[1] - b))),
    "ties": (dict(weights=[1.0, 2.0], density=0.3), lambda b, ms: ref_ties(b, ms, [1.0, 2.0], 0.3)),
    "slerp": (dict(t=0.3), lambda b, ms: ref_slerp(0.3, ms[0], ms[1])),
}


@pytest.mark.parametrize("method", list(CASES))
def test_merged_model_reloads_and_equals_the_formula(method, family, states, tmp_path):
    options, formula = CASES[method]
    out = fusekit.run_merge(family["base"], [family["trained"], family["noisy"]], tmp_path / "out", method=method, progress=False, **options).out
    merged = AutoModelForCausalLM.from_pretrained(out)
    b, ms = states["base"], [states["trained"], states["noisy"]]
    expect = {k: formula(b[k], [m[k] for m in ms]) for k in b}
    got = {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}
    assert set(got) == set(expect)
    for k in expect:
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-5, atol=1e-6, err_msg=k)

    reference = AutoModelForCausalLM.from_pretrained(family["base"])
    reference.load_state_dict({k: torch.from_numpy(v).float() for k, v in expect.items()})
    with torch.no_grad():
        logits = merged(IDS).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, reference(IDS).logits, rtol=1e-4, atol=1e-5)
    # the base's config and tokenizer travel with the output
    assert json.loads((out / "config.json").read_text()) == json.loads((family["base"] / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(family["base"]).get_vocab()


def test_varm_report_matches_the_formula_and_a_layer_changed_in_one_model_takes_it(family, states, tmp_path):
    result = merge_models(family["base"], [family["layer0"], family["trained"]], tmp_path / "v", progress=False)
    report = json.loads((result.out / "varm_weights.json").read_text())
    assert (result.out / "varm_weights.png").stat().st_size > 1000
    by_name = {r["name"]: r for r in report["tensors"]}
    b, l0, tr = states["base"], states["layer0"], states["trained"]
    merged = _state(result.out)
    for name, row in by_name.items():
        assert sum(row["weights"]) == pytest.approx(1.0)
        _, w = ref_varm(b[name], [l0[name], tr[name]])
        assert row["weights"] == pytest.approx(w, rel=1e-4, abs=1e-9), name
    # Outside layer 0, the first model equals the base: its weight is 0 and the merge is the trained model.
    outside = [n for n in by_name if ".layers.0." not in n]
    assert outside
    for name in outside:
        assert by_name[name]["weights"][0] == 0.0
        np.testing.assert_array_equal(merged[name], tr[name])
    frame = result.varm.by_layer()
    assert set(frame["group"]) >= {"layer 0", "layer 1"}


def test_sharded_inputs_and_output(family, states, tmp_path):
    sharded = tmp_path / "sharded_noisy"
    AutoModelForCausalLM.from_pretrained(family["noisy"]).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    result = merge_models(family["base"], [family["trained"], sharded], tmp_path / "o", "linear", max_shard_size="30KB", progress=False)
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert len(result.shards) > 2 and set(index["weight_map"].values()) == {p.name for p in result.shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for p in result.shards for t in load_file(p).values()
    )
    got = _state(result.out)
    for k, v in states["base"].items():
        np.testing.assert_allclose(got[k], (states["trained"][k] + states["noisy"][k]) / 2, rtol=1e-6, atol=1e-7)
    assert not list(result.out.glob("*.tmp"))


def test_dare_is_reproducible_and_seeded(family, tmp_path):
    args = (family["base"], [family["trained"], family["noisy"]])
    a = merge_models(*args, tmp_path / "a", "dare_ties", density=0.5, seed=3, progress=False)
    b = merge_models(*args, tmp_path / "b", "dare_ties", density=0.5, seed=3, progress=False)
    c = merge_models(*args, tmp_path / "c", "dare_ties", density=0.5, seed=4, progress=False)
    read = lambda r: (r.out / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(a.out)(IDS).logits).all()


def test_output_dtype_and_allowed_dtype_mismatch(family, states, tmp_path):
    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(family["noisy"], dtype=torch.bfloat16).save_pretrained(half)
    with pytest.raises(MergeError, match=r"tensor '.*' is F32 in the base .* but BF16"):
        merge_models(family["base"], [family["trained"], half], tmp_path / "x", progress=False)
    out = merge_models(
        family["base"], [family["trained"], half], tmp_path / "y", "linear", allow_dtype_mismatch=True,
        dtype="bfloat16", progress=False,
    ).out
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


# --- rejected inputs ---------------------------------------------------------------------------------


def test_mismatched_vocabulary_names_the_tensor(family, tmp_path):
    tok = AutoTokenizer.from_pretrained(family["base"])
    bigger = zoo.build_tiny_model("llama", tok, tmp_path / "big", hidden=32, layers=2, heads=2, context=128, pad_vocab_to=400)
    with pytest.raises(MergeError, match=r"'lm_head.weight' has shape \[\d+, 32\] in the base .* but \[400, 32\]"):
        merge_models(family["base"], [bigger], tmp_path / "o", progress=False)


def test_missing_tensor_and_tied_embeddings_are_named(family, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = load_file(family["noisy"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "config.json").write_text((family["noisy"] / "config.json").read_text())
    with pytest.raises(MergeError, match=r"'model.layers.1.mlp.up_proj.weight' is in .*base but not in .*partial"):
        merge_models(family["base"], [partial], tmp_path / "o", progress=False)

    tied = tmp_path / "tied"
    config = AutoConfig.from_pretrained(family["noisy"])
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    with pytest.raises(MergeError, match=r"'lm_head.weight' .*tie_word_embeddings is (False|None) in the base but True"):
        merge_models(family["base"], [tied], tmp_path / "o", progress=False)


def test_models_that_all_tie_embeddings_merge_and_stay_tied(family, tmp_path):
    config = AutoConfig.from_pretrained(family["base"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp_path / "tb")
    with torch.no_grad():
        base.model.embed_tokens.weight.add_(0.1)
    base.save_pretrained(tmp_path / "tm")
    out = merge_models(tmp_path / "tb", [tmp_path / "tm"], tmp_path / "o", "linear", weights=[1.0], progress=False).out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_bad_folders_are_rejected(family, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(MergeError, match="no safetensors weights .*pytorch_model.bin"):
        merge_models(family["base"], [legacy], tmp_path / "o", progress=False)
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge_models(family["base"], [family["noisy"]], family["noisy"], progress=False)
    with pytest.raises(MergeError, match="no model folder"):
        merge_models(family["base"], [tmp_path / "absent"], tmp_path / "o", progress=False)
    out = merge_models(family["base"], [family["noisy"]], tmp_path / "once", "linear", progress=False).out
    with pytest.raises(MergeError, match="already holds model weights"):
        merge_models(family["base"], [family["noisy"]], out, "linear", progress=False)
    merge_models(family["base"], [family["noisy"]], out, "linear", overwrite=True, progress=False)


# --- config and CLI ----------------------------------------------------------------------------------


def test_mergekit_style_config_gives_the_same_merge(family, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['trained']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
        f"  - model: {family['noisy']}\n    parameters: {{weight: 2.0, density: 0.3}}\n"
        "parameters: {normalize: true}\n"
    )
    config = load_config(cfg)
    assert config.method == "ties" and config.weights() == [1.0, 2.0] and config.densities() == [0.3, 0.3]
    a = fusekit.run_merge(config=cfg, out=tmp_path / "a", progress=False).out
    b = fusekit.run_merge(family["base"], [family["trained"], family["noisy"]], tmp_path / "b", method="ties", weights=[1, 2], density=0.3, progress=False).out
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nslices: []\n")
    with pytest.raises(MergeError, match="slices"):
        load_config(bad)


def test_a_merge_does_not_inherit_the_base_models_card_or_training_logs(family, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    # What `fusekit train` leaves beside the weights: true of the base run, not of a merge of it.
    records = {"README.md": "---\nbase_model: x\n---\n# a trained model\n", "metrics.jsonl": "{}\n", "fusekit_train.json": "{}", "tracking.json": "{}"}
    for name, text in records.items():
        (base / name).write_text(text)
    out = fusekit.run_merge(base, [family["trained"], family["noisy"]], tmp_path / "m", method="linear", progress=False, plot=False).out
    assert not any((out / name).exists() for name in records)
    assert (out / "config.json").is_file()  # the side files a model needs are still copied


def _cli(*args) -> subprocess.CompletedProcess:
    code = "import sys; from fusekit.cli import main; sys.argv = ['fusekit', *sys.argv[1:]]; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_the_varm_table_and_one_line_errors(family, tmp_path):
    ok = _cli("merge", "--base", family["base"], "--model", family["layer0"], "--model", family["trained"],
              "--out", tmp_path / "cli", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "VaRM weights" in ok.stdout and "layer 0" in ok.stdout and "GB/s" in ok.stdout
    assert (tmp_path / "cli" / "varm_weights.json").is_file()
    bad = _cli("merge", "--base", family["base"], "--model", family["noisy"], "--method", "dare_linear", "--out", tmp_path / "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: method dare_linear needs a density") and "Traceback" not in bad.stderr
