"""`fusekit align` over extraction stores: a hand-worked text, then real tokenizers of three families
(byte-level BPE target, Unigram and WordPiece sources) on tiny models, extracted by `fusekit.extract`."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fusekit
from fusekit import zoo
from fusekit.align.vocab_cache import vocab_map
from fusekit.store.aligned_store import AlignedStore
from fusekit.store.errors import StoreError
from fusekit.store.shards import verify_store
from fusekit.store.types import Window
from align_store_data import MemoryExtractStore, extract_three
import reference

K = 4
WINDOW = 64


# ---------------------------------------------------------------------------------------------- by hand


def _win(text_id, w, span, ids, offsets, topk_ids, topk_p, ce):
    n = len(ids)
    return Window(
        text_id=text_id,
        window=w,
        char_start=span[0],
        char_end=span[1],
        input_ids=np.array(ids, dtype=np.int64),
        offsets=np.array(offsets, dtype=np.int64),
        topk_ids=np.array(topk_ids, dtype=np.int32).reshape(n, -1),
        topk_logp=np.log(np.array(topk_p, dtype=np.float32)).reshape(n, -1),
        ce=np.array(ce, dtype=np.float32),
        mean_ce=float(np.nanmean(ce)) if n > 1 else math.nan,
    )


def _plain_store(name, vocab, windows, fp="corpus-1", n_texts=1):
    settings = {"model": name, "tokenizer_fingerprint": f"tok-{name}", "corpus_fingerprint": fp, "k": 2, "max_length": 2, "vocab_size": len(vocab)}
    return MemoryExtractStore(settings=settings, vocab=vocab, scheme="plain", texts={0: windows}, n_texts=n_texts)


@pytest.fixture
def hand_stores():
    """text "the cat sat" (11 characters).

    target "the"|" ca"|"t"|" s"|"at" in windows of 2: W0 = the, ca [0, 6); W1 = t, s [6, 9); W2 = at [9, 11)
    source "the"|" cat"|" sat", one window. " cat" starts in W0 and ends in W1 (straddles the edge);
    " sat" starts in W1 and ends in W2; no source token starts in W2 (an empty span).
    Vocabulary map (identical string, else MinED, ties to the lowest target id): the→0, " cat"→" ca" (1),
    " sat"→" ca" (1, distance 2 like " s" and "at", lowest id wins).
    """
    tv = ["the", " ca", "t", " s", "at"]
    target = _plain_store(
        "tgt",
        tv,
        [
            _win(0, 0, (0, 6), [0, 1], [0, 3], [[1, 2], [2, 0]], [[0.6, 0.2], [0.5, 0.25]], [0.5, np.nan]),
            _win(0, 1, (6, 9), [2, 3], [6, 7], [[3, 4], [4, 1]], [[0.3, 0.1], [0.4, 0.4]], [0.7, np.nan]),
            _win(0, 2, (9, 11), [4], [9], [[0, 1]], [[0.5, 0.5]], [np.nan]),
        ],
    )
    sv = ["the", " cat", " sat"]
    source = _plain_store(
        "src",
        sv,
        [_win(0, 0, (0, 11), [0, 1, 2], [0, 3, 7], [[1, 2], [2, 0], [0, 1]], [[0.5, 0.3], [0.6, 0.1], [0.2, 0.2]], [1.0, 2.0, np.nan])],
    )
    return target, source


def test_hand_worked_text(hand_stores, tmp_path):
    target, source = hand_stores
    report = fusekit.run_align(target, [source], tmp_path / "out", vocab_map_cache=tmp_path / "cache", method="fusellm", progress=False).report
    store = AlignedStore(tmp_path / "out")
    assert len(store) == 3 and list(store.window_lengths()) == [2, 2, 1]
    w0, w1, w2 = store[0], store[1], store[2]

    # The target's own candidate: its top-k renormalised over the k kept.
    t0 = w0.candidates[0]
    np.testing.assert_array_equal(t0.ids, [[1, 2], [2, 0]])
    np.testing.assert_allclose(t0.probs, [[0.75, 0.25], [2 / 3, 1 / 3]], atol=1e-3)
    np.testing.assert_allclose(t0.ce, [0.5, np.nan])
    assert t0.mean_ce == pytest.approx(0.5)

    # W0: DTW (the,the) (cat,ca). Both 1:1 and agreeing through the map: carried.
    s0 = w0.candidates[1]
    # source "the": " cat" (0.5) → " ca" (1), " sat" (0.3) → " ca" (1): collide, summed → one entry.
    np.testing.assert_array_equal(s0.ids[0], [1, -1])
    np.testing.assert_allclose(s0.probs[0], [1.0, 0.0], atol=1e-3)
    # source " cat" (straddles the edge, belongs to W0): " sat" (0.6) → 1, "the" (0.1) → 0.
    np.testing.assert_array_equal(s0.ids[1], [1, 0])
    np.testing.assert_allclose(s0.probs[1], [6 / 7, 1 / 7], atol=1e-3)
    np.testing.assert_allclose(s0.ce, [1.0, 2.0])  # the source's own CE at the partner
    assert s0.mean_ce == pytest.approx(1.5)  # source tokens starting in [0, 6): CE 1.0 and 2.0

    # W1: only " sat" starts in [6, 9); it maps to " ca", agreeing with neither "t" nor " s".
    s1 = w1.candidates[1]
    np.testing.assert_array_equal(s1.ids, [[3, -1], [-1, -1]])  # one-hot on the NEXT target token " s"
    np.testing.assert_allclose(s1.probs, [[1.0, 0.0], [0.0, 0.0]])
    assert np.isnan(s1.ce).all() and math.isnan(s1.mean_ce)  # " sat" has no CE (last source token)

    # W2: empty span. Its only position is the last: no entries, CE NaN, mean NaN.
    s2 = w2.candidates[1]
    np.testing.assert_array_equal(s2.ids, [[-1, -1]])
    assert np.isnan(s2.ce).all() and math.isnan(s2.mean_ce)

    # Each candidate's mass before renormalising (format 3): the target's top-2 mass per row; a carried
    # source row its source row's top-2 mass (W0: 0.5 + 0.3 after "the", 0.6 + 0.1 after " cat"); a one-hot
    # fallback 1; an empty row 0.
    np.testing.assert_allclose(t0.mass, [0.8, 0.75], rtol=1e-6)
    np.testing.assert_allclose(w1.candidates[0].mass, [0.4, 0.8], rtol=1e-6)
    np.testing.assert_allclose(w2.candidates[0].mass, [1.0], rtol=1e-6)
    np.testing.assert_allclose(s0.mass, [0.8, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(s1.mass, [1.0, 0.0])
    np.testing.assert_array_equal(s2.mass, [0.0])
    assert store.has_mass and store.settings["format_version"] == 3

    (src,) = report["sources"]
    assert src["positions"] == 1 + 1 + 0 and src["carried"] == 1  # W0 pos 0 carried, W1 pos 0 fell back
    assert src["carried_share"] == pytest.approx(0.5) and src["fallback_share"] == pytest.approx(0.5)
    assert src["empty_windows"] == 1
    # carried position W0/0: source top-k mass 0.8, on exactly mapped ids: none (" cat", " sat" map by MinED).
    assert src["topk_mass_mean"] == pytest.approx(0.8, abs=1e-6) and src["kept_mass_mean"] == 0.0
    assert src["vocab_map"]["exact"] == 1 and src["vocab_map"]["min_ed"] == 2
    # report.json holds everything but this run's speeds (timings.json), so identical stores have identical reports.
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "run" not in on_disk and all("tokens_per_s" not in x for x in on_disk["sources"])
    assert on_disk == {**{k: v for k, v in report.items() if k != "run"}, "sources": [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in report["sources"]]}
    assert json.loads((tmp_path / "out" / "timings.json").read_text())["run"] == report["run"]
    assert verify_store(tmp_path / "out") == []
    # A re-run with every shard complete aligns nothing: the report stays, and so do the last run's timings.
    timings = (tmp_path / "out" / "timings.json").read_bytes()
    again = fusekit.run_align(target, [source], tmp_path / "out", vocab_map_cache=tmp_path / "cache", method="fusellm", progress=False).report
    assert again["run"]["shards"] == [] and json.loads((tmp_path / "out" / "report.json").read_text()) == on_disk
    assert (tmp_path / "out" / "timings.json").read_bytes() == timings


def test_refuses_other_corpus_and_incomplete(hand_stores, tmp_path):
    target, source = hand_stores
    other = _plain_store("src", source.vocab, source.texts[0], fp="corpus-2")
    with pytest.raises(StoreError, match="another corpus"):
        fusekit.run_align(target, [other], tmp_path / "a", progress=False).report
    source.is_complete = False
    with pytest.raises(StoreError, match="incomplete"):
        fusekit.run_align(target, [source], tmp_path / "b", progress=False).report


def test_vocab_map_cache(tmp_path):
    src, tgt = ["the", " cat", " sat", "x"], ["the", " ca", "t", " s", "at"]
    first = vocab_map(src, tgt, "a", "b", tmp_path)
    assert first.ids.tolist() == reference.map_vocab(src, tgt)
    assert first.exact.tolist() == [True, False, False, False]
    (cached,) = list(tmp_path.iterdir())
    again = vocab_map(src, tgt, "a", "b", tmp_path)  # read back from the file
    assert again.ids.tolist() == first.ids.tolist() and again.stats == first.stats
    # Same fingerprints, another vocabulary: the digest check rebuilds instead of trusting the file.
    other = vocab_map(src, ["x", "the", " ca", "t", " s"], "a", "b", tmp_path)
    assert other.ids.tolist() == reference.map_vocab(src, ["x", "the", " ca", "t", " s"])
    cached.write_bytes(b"garbage")
    assert vocab_map(src, tgt, "a", "b", tmp_path).ids.tolist() == first.ids.tolist()


# ---------------------------------------------------------------------------------------------- real stores


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tokenizers_by_kind, corpus_texts):
    """Tiny models of three architectures and tokenizer families, extracted over one corpus."""
    root = tmp_path_factory.mktemp("align")
    data = extract_three(root, tokenizers_by_kind, [t[:1200] for t in corpus_texts[:8]], k=K, window=WINDOW)
    stores = data["stores"]
    aligned = root / "aligned"
    report = fusekit.run_align(
        stores["bpe"], [stores["unigram"], stores["wordpiece"]], aligned, vocab_map_cache=root / "cache", method="fusellm", progress=False
    ).report
    return {**data, "aligned": aligned, "report": report}


def _text_tokens(store, text_id):
    ws = dict(store.iter_texts(range(text_id, text_id + 1)))[text_id]
    cat = lambda f: np.concatenate([getattr(w, f) for w in ws])  # noqa: E731
    return {f: cat(f) for f in ("input_ids", "offsets", "topk_ids", "topk_logp", "ce")}


def test_carried_and_fallback_match_a_reference(extracted):
    """Every 3rd window, each source: the pure-Python DTW and top-k transfer of tests/reference.py on
    the source tokens starting in the window's span must give the stored candidate."""
    from fusekit.store.extract_store import ExtractStore

    tgt = ExtractStore(extracted["stores"]["bpe"])
    srcs = [ExtractStore(extracted["stores"][k]) for k in ("unigram", "wordpiece")]
    tgt_windows = list(tgt.iter_windows())
    store = AlignedStore(extracted["aligned"])
    assert len(store) == len(tgt_windows)
    mappings = [vocab_map(src.vocab, tgt.vocab, "x", "y", extracted["root"] / "cache-test", None, src.vocab_info, tgt.vocab_info).ids for src in srcs]
    usable = tgt.vocab_info.usable.tolist()
    for src, mapping in zip(srcs, mappings):  # a sample of the map against the brute-force reference
        sample = [i for i in range(0, len(src.vocab), 23) if src.vocab_info.usable[i]]
        assert mapping[sample].tolist() == reference.map_vocab([src.vocab[i] for i in sample], tgt.vocab, usable)
        special = src.vocab_info.kind >= 2
        s_info, t_info = src.vocab_info, tgt.vocab_info
        for role in ("eos", "eot"):  # the end tokens map by role (or onto the target's other end token)
            end = getattr(s_info, role)
            if end is not None:
                assert mapping[end] in {getattr(t_info, role), t_info.eos, t_info.eot} - {None}
                special[end] = False
        assert (mapping[special] == -1).all()  # other specials and padded ids: nowhere
    checked_carried = checked_fallback = 0
    for idx in range(0, len(store), 3):
        tw, aw = tgt_windows[idx], store[idx]
        assert (aw.text_id, aw.window) == (tw.text_id, tw.window)
        np.testing.assert_array_equal(aw.input_ids, tw.input_ids)
        for s_i, src in enumerate(srcs):
            full = _text_tokens(src, tw.text_id)
            sel = (full["offsets"] >= tw.char_start) & (full["offsets"] < tw.char_end)
            src_ids = full["input_ids"][sel]
            cand = aw.candidates[1 + s_i]
            mapping = mappings[s_i]
            path = reference.dtw_path([src.vocab[i] for i in src_ids], [tgt.vocab[i] for i in tw.input_ids])
            expected = reference.align_topk(
                path, src_ids.tolist(), tw.input_ids.tolist(), mapping.tolist(), full["topk_ids"][sel].tolist(), full["topk_logp"][sel].tolist()
            )
            partners = {j: i for i, j in path}
            for j, (dist, carried) in enumerate(expected):
                got = {int(i): float(p) for i, p in zip(cand.ids[j], cand.probs[j]) if i >= 0}
                assert set(got) == set(dist), (idx, s_i, j)
                for t, p in dist.items():
                    assert got[t] == pytest.approx(p, abs=2e-3)
                if carried:
                    assert cand.ce[j] == pytest.approx(full["ce"][sel][partners[j]], nan_ok=True)
                    # Its mass: what the source row's top-k held on the ids the map sends somewhere, by hand
                    # from the extraction store's log-probs; 1 − it is the source's mass outside the row.
                    row_ids, row_lp = full["topk_ids"][sel][partners[j]], full["topk_logp"][sel][partners[j]].astype(np.float64)
                    kept = sum(math.exp(lp) for i, lp in zip(row_ids.tolist(), row_lp.tolist()) if i >= 0 and mapping[i] >= 0)
                    assert cand.mass[j] == pytest.approx(min(kept, 1.0), rel=1e-5)
                    checked_carried += 1
                else:
                    assert np.isnan(cand.ce[j])
                    if j + 1 < len(tw.input_ids):
                        assert got == {int(tw.input_ids[j + 1]): 1.0}  # one-hot on the next target token
                        assert cand.mass[j] == 1.0  # a one-hot is whole: nothing outside it
                        checked_fallback += 1
                    else:
                        assert cand.mass[j] == 0.0  # the window's last row: empty
            metric = full["ce"][sel]
            metric = metric[np.isfinite(metric)]
            assert cand.mean_ce == pytest.approx(float(metric.mean()), rel=1e-6)
        # The target's own candidate: its stored top-k, renormalised over k, and the mass the k held before:
        # 1 − the mass the target model put outside its top-k.
        p = np.exp(tw.topk_logp.astype(np.float64))
        np.testing.assert_allclose(aw.candidates[0].probs, p / p.sum(1, keepdims=True), atol=2e-3)
        np.testing.assert_allclose(aw.candidates[0].mass, np.minimum(p.sum(1), 1.0), rtol=1e-6)
        np.testing.assert_array_equal(aw.candidates[0].ids, tw.topk_ids)
        np.testing.assert_allclose(aw.candidates[0].ce, tw.ce)
    assert checked_carried > 50 and checked_fallback > 50


def test_report(extracted):
    from fusekit.store.extract_store import ExtractStore

    report = extracted["report"]
    tgt = ExtractStore(extracted["stores"]["bpe"])
    positions = sum(len(w.input_ids) - 1 for w in tgt.iter_windows())
    assert report["target"]["tokens"] == tgt.token_count()
    for s, kind in zip(report["sources"], ("unigram", "wordpiece")):
        src = ExtractStore(extracted["stores"][kind])
        assert s["positions"] == positions
        assert 0.2 < s["carried_share"] < 1.0
        assert s["carried_share"] + s["fallback_share"] == pytest.approx(1.0)
        # Exact: an identical string among the ids that may take mass (no specials, byte twins or padding).
        usable_tgt = {t for t, ok in zip(tgt.vocab, tgt.vocab_info.usable.tolist()) if ok}
        assert s["vocab_map"]["exact"] == sum(t in usable_tgt for t, ok in zip(src.vocab, src.vocab_info.usable.tolist()) if ok)
        assert s["bad_mass"] == 0.0 and s["method"] == "fusellm"
        assert 0 < s["perfect_source_recall"] <= s["carried_share"]
        assert 0 < s["kept_mass_mean"] <= s["topk_mass_mean"] <= 1.0
        assert s["tokens_per_s"] > 0
    assert report["run"]["tokens"] == tgt.token_count()


def test_bytespan_reaches_the_positions_the_paper_rule_drops(extracted, tmp_path):
    """Same stores, the byte-span transfer: perfect-source recall far above the paper rule's and near 1, no
    mass on ids the target tokenizer never emits, and rows whose like-for-like CE matches their own entry.
    (Carried shares are not compared: these tiny random models rarely hold a consistent continuation in
    their top-k, and inside a source token the transfer carries only what the top-k knows.)"""
    stores = extracted["stores"]
    out = tmp_path / "bytespan"
    report = fusekit.run_align(stores["bpe"], [stores["unigram"], stores["wordpiece"]], out, progress=False).report
    for paper, new in zip(extracted["report"]["sources"], report["sources"]):
        assert new["method"] == "bytespan"
        assert new["perfect_source_recall"] > paper["perfect_source_recall"] + 0.1
        assert new["bad_mass"] == 0.0
    assert report["sources"][0]["perfect_source_recall"] > 0.9  # Unigram source: the same text, other pieces
    store = AlignedStore(out)
    below_one = checked = 0
    for w in store.iter_windows():
        for c in w.candidates[1:]:
            rows = np.flatnonzero(np.isfinite(c.ce[:-1]))
            for j in rows[:5]:
                # CE = −ln of the source's (unnormalised) probability of the target's next token: it can be
                # no smaller than −ln of the renormalised probability the row puts on it — and with the row's
                # mass it is exactly −ln(probs · mass) there: the mass undoes the renormalisation.
                p = c.probs[j][c.ids[j] == w.input_ids[j + 1]].sum()
                if p > 0:  # (the true token may have been cut from the row's k entries)
                    assert c.ce[j] >= -np.log(p) - 2e-3  # probabilities are stored as float16
                    if p > 1e-3:  # float16 keeps ~3 digits of a probability this large (not of a subnormal one)
                        assert c.ce[j] == pytest.approx(-np.log(p * c.mass[j]), abs=2e-3)
                        checked += 1
            # The mass is a probability; a one-hot fallback is whole (1), the window's last row empty (0).
            assert ((c.mass >= 0) & (c.mass <= 1)).all()
            fallback = ~np.isfinite(c.ce[:-1]) & (c.ids[:-1, 0] == w.input_ids[1:]) & (c.probs[:-1, 0] == 1)
            assert (c.mass[:-1][fallback] == 1).all() and c.mass[-1] == 0
            below_one += int((c.mass[:-1] < 0.99).sum())
    assert below_one > 0 and checked > 20  # these tiny models' top-4 leave mass out: the rest the losses see
    # A window's mean CE is the mean over its rows with a known CE (a row with none — a source window's last
    # row when the true token is outside the top-k — must not make the whole window's mean unknown).
    unknown = 0
    for w in store.iter_windows():
        for c in w.candidates[1:]:
            known = np.isfinite(c.ce[:-1])
            if w.loss_mask is not None:
                known &= np.asarray(w.loss_mask, bool)[1:]
            unknown += int((~np.isfinite(c.ce[:-1]) & (c.ids[:-1, 0] != w.input_ids[1:])).sum())
            if known.any():
                assert c.mean_ce == pytest.approx(float(c.ce[:-1][known].astype(np.float64).mean()), rel=1e-3, abs=1e-3)
    assert unknown > 0  # such rows exist in these stores (else this test would check nothing new)


def test_store_reads_randomly_and_in_order(extracted):
    store = AlignedStore(extracted["aligned"])
    ordered = list(store.iter_windows())
    assert len(ordered) == len(store) == len(store.window_lengths())
    for i in [len(store) - 1, 0, 5, 3, len(store) // 2]:
        w, o = store[i], ordered[i]
        assert (w.text_id, w.window) == (o.text_id, o.window)
        for a, b in zip(w.candidates, o.candidates):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.probs, b.probs)
    assert store[-1].text_id == ordered[-1].text_id
    with pytest.raises(IndexError):
        store[len(store)]
    for w in ordered:
        for c in w.candidates:
            rows = c.probs.sum(1)
            assert np.allclose(rows[(c.ids >= 0).any(1)], 1.0, atol=1e-5)


def test_shard_union_equals_serial(extracted, tmp_path):
    s = extracted["stores"]
    args = (s["bpe"], [s["unigram"], s["wordpiece"]])
    kw = dict(vocab_map_cache=extracted["root"] / "cache", progress=False)
    fusekit.run_align(*args, tmp_path / "serial", num_shards=3, workers=1, **kw).report
    for i in (2, 0, 1):
        fusekit.run_align(*args, tmp_path / "sharded", shard=f"{i}/3", **kw).report
    _assert_same_files(tmp_path / "serial", tmp_path / "sharded")
    assert verify_store(tmp_path / "sharded") == []
    with pytest.raises(StoreError, match="other settings"):  # a different N into the same store
        fusekit.run_align(*args, tmp_path / "sharded", shard="0/2", **kw).report


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "timings.json")  # report.json too: no speeds in it
    assert names == sorted(p.name for p in b.iterdir() if p.name != "timings.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _align_command(extracted, out: Path, *options: str) -> list[str]:
    """The `fusekit align` console command of the three extracted stores into `out`."""
    s = extracted["stores"]
    exe = shutil.which("fusekit")
    assert exe is not None
    return [exe, "align", "-t", str(s["bpe"]), "-s", str(s["unigram"]), "-s", str(s["wordpiece"]), "-o", str(out),
            "--vocab-map-cache", str(extracted["root"] / "cache"), *options]


@pytest.mark.parametrize(("workers", "sig"), [(1, signal.SIGKILL), (2, signal.SIGKILL), (2, signal.SIGINT)])
def test_kill_and_resume_is_byte_identical(extracted, tmp_path, workers, sig):
    """kill -9 (or Ctrl-C) a real `fusekit align` mid-run, re-run it: the store equals an uninterrupted
    run's (2 workers: two shards at work when the signal lands). Ctrl-C ends the run at the shards'
    next batch with one line, whichever of the process's threads the signal reaches."""
    s = extracted["stores"]
    out = tmp_path / "killed"
    cmd = _align_command(extracted, out, "--shards", "8", "--workers", str(workers), "--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.name.endswith(".parquet.json") for p in out.iterdir()):
            break
        time.sleep(0.001)
    os.kill(proc.pid, sig)
    proc.wait()
    stderr = proc.stderr.read().decode()
    done = [p for p in out.iterdir() if p.name.endswith(".parquet.json")]
    assert 1 <= len(done) < 8, f"the signal did not land mid-run, or did not stop it ({len(done)} shards done): {stderr!r}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and stderr.startswith("error: interrupted;") and "run the same command again" in stderr, stderr
    with pytest.raises(StoreError, match="incomplete"):
        AlignedStore(out)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    fusekit.run_align(s["bpe"], [s["unigram"], s["wordpiece"]], tmp_path / "clean", num_shards=8, vocab_map_cache=extracted["root"] / "cache", progress=False).report
    _assert_same_files(tmp_path / "clean", out)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_piped_report_keeps_its_whole_table(extracted, tmp_path):
    """A batch job's log (stdout and stderr not terminals, no COLUMNS): the report's table is printed at
    its own width, not cut at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(_align_command(extracted, tmp_path / "a"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stderr.splitlines() if line.startswith(("┃", "│"))]
    assert rows and any("tok/s" in line for line in rows)
    assert all("…" not in line for line in rows) and max(map(len, rows)) > 80, rows


def test_cli_refuses_other_corpus_in_one_line(extracted, tmp_path):
    from fusekit.cli import app

    other_corpus = tmp_path / "other.jsonl"
    other_corpus.write_text(json.dumps({"text": extracted["texts"][0]}) + "\n", encoding="utf-8")
    other = fusekit.run_extract(str(extracted["root"] / "model-unigram"), other_corpus, tmp_path / "x-other", top_k=K, max_length=WINDOW, progress=False).out
    result = CliRunner().invoke(app, ["align", "-t", str(extracted["stores"]["bpe"]), "-s", str(other), "-o", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 1
    assert "another corpus" in result.output and "Traceback" not in result.output
    partial = fusekit.run_extract(str(extracted["root"] / "model-unigram"), extracted["corpus"], tmp_path / "x-part", top_k=K, max_length=WINDOW, shard="0/2", progress=False).out
    result = CliRunner().invoke(app, ["align", "-t", str(extracted["stores"]["bpe"]), "-s", str(partial), "-o", str(tmp_path / "o2"), "--no-progress"])
    assert result.exit_code == 1 and "incomplete" in result.output
    result = CliRunner().invoke(app, ["align", "-t", str(tmp_path / "nope"), "-s", str(partial), "-o", str(tmp_path / "o3")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_trainer_reads_the_store_and_trains(extracted, tmp_path):
    from fusekit.train.source import open_source

    source = open_source(extracted["aligned"])
    assert source.random_access
    lengths = source.lengths()
    assert lengths.sum() == extracted["report"]["target"]["tokens"]
    for i in (0, len(lengths) - 1):
        w = source.get(i)
        n = len(w.input_ids)
        assert n == lengths[i] and w.input_ids.dtype == np.int64 and len(w.candidates) == 3
        for c in w.candidates:
            assert c.ids.shape == (n, K) and c.probs.shape == (n, K) and c.ce.shape == (n,)
    out = fusekit.run_train(
        str(extracted["root"] / "model-bpe"), extracted["aligned"], tmp_path / "trained",
        epochs=1, max_steps=2, batch_size=2, max_length=WINDOW, lr=1e-3, progress=False,
    ).out
    assert (Path(out) / "fusekit_train.json").is_file()
