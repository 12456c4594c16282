"""Extraction at scale: packed rows (no compute on padding) store what padded batches store; a shard
another process is writing is skipped, not computed twice (issue 18)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import fusekit
from fusekit import zoo
from fusekit.cli import app
from fusekit.extract import ExtractStore
from fusekit.extract.model import forward_topk, forward_topk_packed
from fusekit.models.packing import pack_windows, packed_rows, packing_supported
from fusekit.store.lock import ShardLock

STEP, FINE = 0.125, 1 / 256


def test_first_fit_decreasing_by_hand():
    # lengths 5 7 3 2 6 into rows of 10: 7 → row0 (3 left), 6 → row1 (4), 5 → row2 (5), 3 → row0 (0), 2 → row1 (2)
    assert pack_windows([5, 7, 3, 2, 6], 10) == [[1, 2], [4, 3], [0]]
    assert pack_windows([12, 1], 10) == [[0], [1]]  # too long for a row: alone
    ids, pos = packed_rows([np.array([7, 8, 9]), np.array([4, 5])], [[0, 1]])
    assert ids.tolist() == [[7, 8, 9, 4, 5]] and pos.tolist() == [[0, 1, 2, 0, 1]]
    ids, pos = packed_rows([np.array([7, 8, 9]), np.array([4])], [[0], [1]])
    assert ids.tolist() == [[7, 8, 9], [4, 0, 0]] and pos.tolist() == [[0, 1, 2], [0, 0, 1]]


@pytest.fixture(scope="module")
def models(tokenizers_by_kind, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "gpt2", hidden=32, context=64),
        "llama": zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], root / "llama", hidden=32, context=64, seed=1),
        "gpt_neox": zoo.build_tiny_model("gpt_neox", tokenizers_by_kind["wordpiece"], root / "neox", hidden=32, context=64, seed=2),
    }


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_packed_rows_give_each_windows_own_distribution(arch, fused_head, models, monkeypatch):
    """Against the slow reference: every window alone through the model, full log-softmax; with the output
    layer applied per tile and with the model's logits. Tiles of 7 positions × 7 ids here (the vocabulary
    ends in a tile narrower than k), so windows span several row tiles and every row many vocabulary tiles."""
    from transformers import AutoModelForCausalLM

    from fusekit.extract import model as extract_model

    monkeypatch.setattr(extract_model, "_TILE_FLOATS", 49)
    net = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    vocab = net.config.vocab_size
    assert packing_supported(net, vocab) and extract_model.tile_shape(100, vocab) == (7, 7) and vocab % 7 < 5
    gen = np.random.default_rng(3)
    windows = [gen.integers(0, vocab, n) for n in (30, 3, 17, 9, 1, 24, 12)]
    rows = pack_windows([len(w) for w in windows], 32)
    assert len(rows) < len(windows)  # really packed
    got = forward_topk_packed(net, windows, rows, 5, vocab, fused_head=fused_head)
    padded = forward_topk(net, windows, 5, vocab, fused_head=fused_head)
    for i, w in enumerate(windows):
        with torch_no_grad():
            logp = torch_log_softmax(net, w)
        top = np.sort(logp, axis=1)[:, ::-1][:, :5]
        for r in (got[i], padded[i]):
            np.testing.assert_allclose(r.topk_logp, top, atol=1e-4)
            np.testing.assert_allclose(np.take_along_axis(logp, r.topk_ids.astype(np.int64), 1), top, atol=1e-4)
            ce = -logp[np.arange(len(w) - 1), w[1:]]
            np.testing.assert_allclose(r.ce[:-1], ce, atol=1e-4)
            assert np.isnan(r.ce[-1])


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_tiles_give_the_full_rows_top_k_and_ce(k, monkeypatch):
    """topk_and_ce over 7 × 7 tiles of a 13 × 50 logit matrix (k up to the whole vocabulary, more than
    the first tiles hold) against numpy's sort and log-softmax of each whole row, in float64."""
    import torch

    from fusekit.extract import model as extract_model

    monkeypatch.setattr(extract_model, "_TILE_FLOATS", 49)
    gen = np.random.default_rng(k)
    logits = gen.normal(0, 4, (13, 50)).astype(np.float32)
    logits[3, [4, 40]] = logits[3].max() + 1  # a tie across tiles: either order is a right answer
    nxt = gen.integers(0, 50, 13)
    ids, logp, ce = extract_model.topk_and_ce(
        lambda r0, r1, v0, v1: torch.as_tensor(logits[r0:r1, v0:v1]), 13, 50, torch.as_tensor(nxt), k)
    full = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64), axis=1, keepdims=True)
    assert ids.shape == (13, k) and logp.shape == (13, k)
    np.testing.assert_allclose(logp.numpy(), np.sort(full, axis=1)[:, ::-1][:, :k], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, ids.numpy(), 1), logp.numpy(), atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())
    np.testing.assert_allclose(ce.numpy(), -full[np.arange(13), nxt], atol=1e-5)
    with pytest.raises(ValueError, match="top-k 51 exceeds the vocabulary"):
        extract_model.topk_and_ce(lambda *a: None, 13, 50, torch.as_tensor(nxt), 51)


def test_the_fused_head_makes_no_batch_logits_and_is_skipped_where_logits_are_transformed(models):
    """Where the logits are the output layer's, the model runs with that layer fed no positions (its
    logits come out [B, 0, V], not [B, n, V]); a Gemma-2 soft-capping its logits after the layer (at the
    real cap of 30) keeps the model's own logits, and both match the reference."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from fusekit.models.head import head_usable

    seen = []

    def record(_module, _args, out):
        seen.append(tuple(out.logits.shape))

    net = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    capped = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)).eval()
    assert head_usable(net) and not head_usable(capped)
    gen = np.random.default_rng(4)
    for model, fused in ((net, True), (capped, False)):
        vocab = model.config.vocab_size
        windows = [gen.integers(0, vocab, n) for n in (11, 6)]
        seen.clear()
        handle = model.register_forward_hook(record)
        try:
            got = forward_topk(model, windows, 3, vocab)
        finally:
            handle.remove()
        assert seen == [(2, 0 if fused else 11, vocab)]
        for r, w in zip(got, windows):
            with torch.no_grad():
                logp = torch_log_softmax(model, w)
            np.testing.assert_allclose(r.topk_logp, np.sort(logp, axis=1)[:, ::-1][:, :3], atol=1e-4)


def torch_no_grad():
    import torch

    return torch.no_grad()


def torch_log_softmax(net, ids: np.ndarray) -> np.ndarray:
    import torch

    logits = net(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()


@pytest.fixture(scope="module")
def mixed_corpus(corpus_texts, tmp_path_factory):
    """Texts from a few characters to several windows long."""
    gen = np.random.default_rng(0)
    flat = " ".join(t.replace("\n", " ") for t in corpus_texts)
    lengths = np.clip(np.round(gen.lognormal(np.log(60), 1.2, 14)), 5, 900).astype(int)
    starts = gen.integers(0, len(flat) - 1000, len(lengths))
    path = tmp_path_factory.mktemp("c") / "mixed.txt"
    path.write_text("\n".join(flat[s : s + n].strip() or "x" for s, n in zip(starts, lengths)) + "\n")
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_and_padded_extraction_store_the_same_values(arch, models, mixed_corpus, tmp_path):
    args = dict(top_k=6, max_length=48, batch_size=3, num_shards=2, progress=False)
    packed = ExtractStore(fusekit.run_extract(models[arch], mixed_corpus, tmp_path / "p", **args).out)
    padded = ExtractStore(fusekit.run_extract(models[arch], mixed_corpus, tmp_path / "q", pack=False, **args).out)
    a, b = list(packed.iter_windows()), list(padded.iter_windows())
    assert len(a) == len(b) > 14 and any(len(w.input_ids) < 20 for w in a)
    for x, y in zip(a, b):
        assert (x.text_id, x.window) == (y.text_id, y.window)
        assert np.array_equal(x.input_ids, y.input_ids)
        # the codec's bounds (docs/EXTRACT.md): both stores hold the model's values to within them
        assert np.abs(x.topk_logp - y.topk_logp).max() <= 2 * (STEP + FINE)
        np.testing.assert_allclose(x.ce, y.ce, atol=2 * FINE, equal_nan=True)
        assert abs(x.mean_ce - y.mean_ce) < 1e-4 or np.isnan(x.mean_ce)


def test_a_model_that_transforms_its_logits_is_extracted_with_a_warning_on_their_size(tokenizers_by_kind, mixed_corpus, tmp_path):
    """A soft-capping Gemma-2 through `fusekit extract`: one warning line giving what a batch's whole logits
    hold (3 × 48 × V fp32), and a store like any other."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tokenizers_by_kind["bpe"]
    config = Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
                          max_position_embeddings=64)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    # the fusekit command itself: it prints a Python warning as one "warning:" line
    done = subprocess.run([sys.executable, "-m", "fusekit.cli", "extract", "--model", str(tmp_path / "gemma2"),
                           "--data", str(mixed_corpus), "--out", str(tmp_path / "x"), "--top-k", "4", "--max-length", "48",
                           "--batch-size", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("warning:")]
    size = 3 * 48 * len(tok) * 4 / 1e3  # KB of fp32
    assert warnings == [
        f"warning: Gemma2ForCausalLM's logits are not its linear output layer's alone (it transforms them), so extraction "
        f"holds each batch's whole logits: 3 × 48 × {len(tok):,} = {size:.1f} KB; lower --batch-size if memory runs short"
    ], done.stderr
    assert len(list(ExtractStore(tmp_path / "x").iter_windows())) > 14


def test_a_shard_another_process_is_writing_is_skipped_with_a_message(models, mixed_corpus, tmp_path):
    out = tmp_path / "s"
    args = ["extract", "-m", models["gpt2"], "-d", mixed_corpus, "-o", out, "--num-shards", "3", "--max-length", "48"]
    out.mkdir()
    held = ShardLock(out, "part-00001-of-00003.parquet")
    assert held.acquire()  # as a second process would hold it (flock: per open file, even in one process)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert "part-00001-of-00003.parquet: another process" in result.output and "skipped" in result.output
        assert not (out / "part-00001-of-00003.parquet").exists()
        assert (out / "part-00000-of-00003.parquet").exists() and (out / "part-00002-of-00003.parquet").exists()
        assert CliRunner().invoke(app, ["inspect", str(out)]).exit_code == 2  # lock file is no problem, the shard is missing
    finally:
        held.release()
    assert not held.path.exists()
    again = CliRunner().invoke(app, [str(a) for a in args])
    assert again.exit_code == 0 and "shard 2/3:" in again.output and "shard 1/3:" not in again.output
    assert ExtractStore(out).complete()
    assert not list(out.glob(".*lock"))


def test_a_dead_holders_lock_does_not_block(tmp_path):
    import subprocess
    import sys

    code = (
        "import os, sys; from fusekit.store.lock import ShardLock; "
        f"l = ShardLock({str(tmp_path)!r}, 'part-00000-of-00001.parquet'); assert l.acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # dies holding it: the file stays, the lock goes
    lock = ShardLock(tmp_path, "part-00000-of-00001.parquet")
    assert lock.path.exists() and lock.acquire()
    lock.release()
