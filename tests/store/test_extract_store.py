"""The extraction store's shard format: the per-shard codec prior, stores of the older codec, damaged priors."""

from __future__ import annotations

import base64
import shutil
import zlib

import numpy as np
import polars as pl
import pytest

import fusekit
from fusekit import zoo
from fusekit.extract import ExtractStore, StoreError
from fusekit.store.atomic import parquet_bytes, write_bytes_atomic, write_json_atomic
from fusekit.store.extract_codec import decode_frame, encode_shard
from fusekit.store.extract_format import CODEC, DEFAULT_STEP, FRESH_CODEC, shard_codec
from fusekit.store.shards import read_manifest, record_shard, settings_digest
from fusekit.store.types import Window

K = 10


def kl_rows(orig: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """KL(softmax(orig) ‖ softmax(stored)) per row, in float64."""
    o = orig.astype(np.float64) - np.logaddexp.reduce(orig.astype(np.float64), axis=1, keepdims=True)
    s = stored.astype(np.float64) - np.logaddexp.reduce(stored.astype(np.float64), axis=1, keepdims=True)
    return (np.exp(o) * (o - s)).sum(axis=1)


def short_windows(rng: np.random.Generator, count: int, vocab: int = 5000) -> list[Window]:
    """Texts of 15–60 tokens from one 'model': Zipf-distributed tokens, a top-k of a softmax whose
    top slot is the next token about half the time (as a model's would be)."""
    out = []
    for text_id in range(count):
        n = int(rng.integers(15, 61))
        ids = np.minimum(rng.zipf(1.2, n) - 1, vocab - 1).astype(np.int64)
        logits = rng.standard_normal((n, 400)) * 2.0
        cand = np.minimum(rng.zipf(1.2, (n, 400)) - 1, vocab - 1)
        for t in range(n - 1):
            cand[t, 0] = ids[t + 1]
            if rng.random() < 0.5:
                logits[t, 0] += 6.0
        topk_ids, topk_logp = [], []
        for t in range(n):
            uniq, first = np.unique(cand[t], return_index=True)
            lp = logits[t, first] - np.logaddexp.reduce(logits[t, first])
            order = np.argsort(-lp, kind="stable")[:K]
            topk_ids.append(uniq[order])
            topk_logp.append(lp[order])
        topk_ids, topk_logp = np.asarray(topk_ids, np.int32), np.asarray(topk_logp, np.float32)
        ce = np.full(n, np.nan, np.float32)
        ce[:-1] = rng.random(n - 1) * 6
        offsets = np.cumsum(rng.integers(1, 7, n)).astype(np.int64) - 1
        out.append(Window(text_id, 0, 0, int(offsets[-1]) + 1, ids, offsets, topk_ids, topk_logp, ce, float(np.mean(ce[:-1]))))
    return out


def test_a_shard_of_short_texts_is_markedly_smaller_with_its_prior_and_decodes_to_the_same_values():
    windows = short_windows(np.random.default_rng(0), 150)
    tokens = sum(len(w.input_ids) for w in windows)
    coded = {}
    for primed in (False, True):
        frame, meta, stats = encode_shard(windows, k=K, vocab_size=5000, primed=primed)
        table, prior = shard_codec(meta)
        assert (prior is not None) == primed and meta["fusekit.codec"] == (CODEC if primed else FRESH_CODEC)
        coded[primed] = (len(parquet_bytes(frame, meta)), stats, decode_frame(frame, table, K, DEFAULT_STEP, prior=prior))
    (fresh_bytes, fresh, fresh_windows), (primed_bytes, primed, primed_windows) = coded[False], coded[True]
    for w, a, b in zip(windows, fresh_windows, primed_windows):
        np.testing.assert_array_equal(a.input_ids, w.input_ids)
        np.testing.assert_array_equal(b.input_ids, w.input_ids)
        np.testing.assert_array_equal(b.offsets, w.offsets)
        np.testing.assert_array_equal(b.topk_ids, w.topk_ids)
        np.testing.assert_array_equal(b.topk_logp, a.topk_logp)  # the same symbols, coded differently
        np.testing.assert_array_equal(b.ce, a.ce)
    kl = kl_rows(np.concatenate([w.topk_logp for w in windows]), np.concatenate([w.topk_logp for w in primed_windows]))
    assert kl.mean() <= 1e-3 and primed.kl_sum == pytest.approx(kl.sum(), rel=1e-3)
    # the windows alone, and the whole file with the prior it carries
    assert primed.payload_bytes < 0.85 * fresh.payload_bytes, (primed.payload_bytes / tokens, fresh.payload_bytes / tokens)
    assert primed_bytes < fresh_bytes
    # the same windows in another order give the same shard: the prior is a pure function of the shard
    again = encode_shard(windows[::-1], k=K, vocab_size=5000)
    assert parquet_bytes(again[0], again[1]) == parquet_bytes(*encode_shard(windows, k=K, vocab_size=5000)[:2])


@pytest.fixture(scope="module")
def store_inputs(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    """A tiny real model and a corpus of short texts (sentences of the corpus)."""
    root = tmp_path_factory.mktemp("inputs")
    model = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "gpt2", hidden=32, context=64)
    sentences = [s.strip() for t in corpus_texts[:6] for s in t.replace("\n", " ").split(". ") if len(s.strip()) > 20][:40]
    corpus = root / "short.txt"
    corpus.write_text("\n".join(sentences) + "\n")
    return model, corpus


@pytest.fixture(scope="module")
def store(store_inputs, tmp_path_factory):
    """The short texts' store, two shards."""
    model, corpus = store_inputs
    out = tmp_path_factory.mktemp("store") / "s"
    return fusekit.run_extract(model, corpus, out, top_k=K, max_length=64, batch_size=8, num_shards=2, progress=False).out


def all_windows(folder) -> list[Window]:
    return list(ExtractStore(folder).iter_windows())


def rewrite_shards(folder, meta_edit, codec: str | None = None) -> None:
    """Re-code every shard of `folder` through `meta_edit(windows, digest) -> (frame, meta)` and record
    it as complete, with the manifest's codec set to `codec` when given (what an older fusekit wrote)."""
    store = ExtractStore(folder)
    by_shard = {name: [w for _, ws in store.iter_texts(held) for w in ws] for name, held, _ in store.shard_ranges()}
    if codec is not None:
        manifest = read_manifest(folder)
        manifest["settings"]["codec"] = codec
        write_json_atomic(manifest, folder / "manifest.json")
    digest = settings_digest(read_manifest(folder)["settings"])
    for name, windows in by_shard.items():
        frame, meta = meta_edit(windows, digest)
        data = parquet_bytes(frame, meta)
        write_bytes_atomic(data, folder / name)
        info = {key: value for key, value in store.sidecar(name).items() if key != "sha256"}  # record_shard hashes the new file
        record_shard(folder, name, {**info, "bytes": len(data)})


def as_older_store(folder) -> None:
    """Rewrite the store at `folder` as an older fusekit wrote it: codec "topk-rc/1", no prior."""
    vocab_size = ExtractStore(folder).vocab_size

    def fresh(windows, digest):
        frame, meta, _ = encode_shard(windows, k=K, vocab_size=vocab_size, primed=False, metadata={"fusekit.settings_sha256": digest})
        return frame, meta

    rewrite_shards(folder, fresh, codec=FRESH_CODEC)


def test_every_shard_carries_its_prior(store):
    for name, _, done in ExtractStore(store).shard_ranges():
        assert done
        meta = pl.read_parquet_metadata(store / name)
        assert meta["fusekit.codec"] == CODEC
        levels = zlib.decompress(base64.b64decode(meta["fusekit.codec_prior"]))
        assert max(levels) <= 64 and len(set(levels)) > 2  # learnt, not the fresh state everywhere


def test_a_store_of_the_older_codec_still_reads(store, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(store, old)
    as_older_store(old)
    assert ExtractStore(old).settings["codec"] == FRESH_CODEC
    assert "fusekit.codec_prior" not in pl.read_parquet_metadata(old / "part-00000-of-00002.parquet")
    got, want = all_windows(old), all_windows(store)
    assert len(got) == len(want) > 30
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        # values already on the grid are coded again to within the grid's rounding
        assert np.abs(a.topk_logp - b.topk_logp).max() <= DEFAULT_STEP


def test_a_resume_finishes_an_older_store_in_its_own_format(store, store_inputs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(store, old)
    as_older_store(old)
    (old / "part-00001-of-00002.parquet").unlink()  # a run killed before its last shard
    model, corpus = store_inputs
    fusekit.run_extract(model, corpus, old, top_k=K, max_length=64, batch_size=8, progress=False).out
    redone = pl.read_parquet_metadata(old / "part-00001-of-00002.parquet")
    assert redone["fusekit.codec"] == FRESH_CODEC and "fusekit.codec_prior" not in redone
    reread = ExtractStore(old)
    assert reread.complete() and reread.settings["codec"] == FRESH_CODEC
    got, want = all_windows(old), all_windows(store)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert np.abs(a.topk_logp - b.topk_logp).max() <= DEFAULT_STEP


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda prior: "not base64 !", "codec prior cannot be read"),
        (lambda prior: base64.b64encode(zlib.compress(b"\x20" * 99)).decode(), "codec prior has 99 cells"),
        (lambda prior: None, "lacks its fusekit.codec_prior"),
    ],
    ids=["garbled", "foreign", "missing"],
)
def test_a_damaged_prior_is_a_store_error_naming_the_shard(store, tmp_path, damage, message):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)

    def damaged(windows, digest):
        frame, meta, _ = encode_shard(windows, k=K, vocab_size=ExtractStore(store).vocab_size,
                                      metadata={"fusekit.settings_sha256": digest})
        value = damage(meta.pop("fusekit.codec_prior"))
        return frame, meta if value is None else {**meta, "fusekit.codec_prior": value}

    rewrite_shards(bad, damaged)
    with pytest.raises(StoreError, match=message) as info:
        all_windows(bad)
    assert str(bad / "part-00000-of-00002.parquet") in str(info.value) and "\n" not in str(info.value)
