"""The byte-span path in Rust, on every core: byte spans, carried spans and the perfect source's draws equal
their Python references (`spans.py`, `remap.py`, numpy) on real tokenizers; the aligned store is the same
file whatever the number of workers and however its rows are batched; shard jobs share one fusechat count
pass through the store."""

from __future__ import annotations

import difflib
import io
import threading
import time
import unicodedata

import numpy as np
import polars as pl
import pytest

import fusekit
import fusekit._core as _core
from fusekit.align.recall import perfect_source_topk
from fusekit.align.remap import remap_spans
from fusekit.align.spans import byte_spans
from fusekit.align.transfer import TextTokens, Transferer, encode_offsets
from fusekit.vocab.info import vocab_info

from real_tokenizers import real_tokenizer

# CJK, emoji with ZWJ sequences and skin tones, combining marks (NFC and NFD), CRLF and tabs, rare characters
# that SentencePiece spells in byte-fallback pieces, RTL and Indic scripts, runs of spaces, special tokens
# written in the text.
TEXTS = [
    "Tokyo 東京 and 北京 ☕😀👩‍👩‍👧 — café vs cafe\u0301, naïve Å\u030a.\r\n\tdef f(x):\r\n\t\treturn x * 1234567\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 ﷽ 🧑🏽‍🚀 \U0010fffd 䨺",
    unicodedata.normalize("NFD", "한국어 Ελληνικά Việt Nam") + " مرحبا بالعالم नमस्ते दुनिया",
    "  two  spaces   \n\n\n\t end  \r\n",
    "</s> an end token <|endoftext|> written in the text <s>",
    "x",
    " ",
    "",
]
TOKENIZERS = ["gpt-2", "llama-spm", "phi-3", "mpt"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_rust_byte_spans_equal_the_python_reference(name):
    tok = real_tokenizer(name)
    info, other = vocab_info(tok), vocab_info(tok)
    t = Transferer(info, other)  # two tables: the source's and the target's Rust side
    byte_level = name == "gpt-2"  # (MPT normalises the text first)
    for text in TEXTS:
        enc = encode_offsets(tok, text)
        want = byte_spans(text, enc.starts, [info.bytes[i] for i in enc.ids.tolist()])
        for side in (info.bytes, other.bytes):
            got = t.spans(text, TextTokens(enc.ids, enc.starts), side)
            assert got.dtype == np.int64 and got.shape == (len(enc.ids), 2)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: {text!r}")
        data = text.encode()
        if byte_level and all(info.bytes[i] for i in enc.ids.tolist()):  # independent of both: byte-level pieces spell the text
            assert b"".join(data[s:e] for s, e in want.tolist()) == data
            assert all(data[s:e] == info.bytes[i] for (s, e), i in zip(want.tolist(), enc.ids.tolist()) if info.bytes[i])
    if name in ("llama-spm", "phi-3"):  # the texts do reach SentencePiece's byte-fallback pieces (<0xF0> …)
        pieces = tok.convert_ids_to_tokens([i for text in TEXTS for i in encode_offsets(tok, text).ids.tolist()])
        assert any(p.startswith("<0x") for p in pieces)
    with pytest.raises(ValueError, match="non-decreasing"):
        t.spans("ab", TextTokens(np.array([1, 2]), np.array([1, 0])), info.bytes)


def _chatml(turns):
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)


def _llama3(turns):
    return "<|begin_of_text|>" + "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in turns)


def test_rust_remap_equals_difflib_reference():
    turns = [("user", "What is 12 × 7? 東京"), ("assistant", "12 × 7 = 84 ☕."), ("user", "And 84 ÷ 7?")]
    tok = real_tokenizer("gpt-2")
    info = vocab_info(tok)
    cases = []
    for a, b in [(_chatml(turns), _llama3(turns)), (_llama3(turns), _chatml(turns)), (TEXTS[0], TEXTS[0])]:
        enc = encode_offsets(tok, a)
        cases.append((a.encode(), b.encode(), byte_spans(a, enc.starts, [info.bytes[i] for i in enc.ids.tolist()])))
    rng = np.random.default_rng(3)
    for _ in range(150):  # short byte strings over a small alphabet: many equal-length matches, every tie rule
        a = bytes(rng.integers(97, 101, rng.integers(0, 40)).tolist())
        b = bytearray(a)
        for _ in range(rng.integers(0, 6)):
            at = int(rng.integers(0, len(b) + 1))
            b[at:at + int(rng.integers(0, 3))] = bytes(rng.integers(97, 102, rng.integers(0, 4)).tolist())
        cuts = np.sort(rng.integers(0, len(a) + 1, rng.integers(0, 8)))
        spans = np.stack([cuts, np.r_[cuts[1:], len(a)]], axis=1) if cuts.size else np.zeros((0, 2), np.int64)
        cases.append((a, bytes(b), spans.astype(np.int64)))
    for a, b, spans in cases:
        np.testing.assert_array_equal(_core.remap_spans(a, b, spans), remap_spans(a, b, spans), err_msg=f"{a!r} → {b!r}")
    # The blocks themselves are difflib's (a few by hand on the fuzzed strings).
    a, b = b"abcabcdd", b"cabdabcd"
    blocks = [(m.a, m.b, m.size) for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() if m.size]
    spans = np.array([[x, x + n] for x, _, n in blocks], np.int64)
    np.testing.assert_array_equal(_core.remap_spans(a, b, spans), [[y, y + n] for _, y, n in blocks])


@pytest.mark.parametrize("vocab_size, k", [(32000, 10), (12, 10), (5, 4), (1, 3), (50257, 1)])
def test_perfect_source_draws_are_numpys(vocab_size, k):
    """Small vocabularies force the redraw rounds (and exhaust them); the draws must be numpy's, since
    recall counts are part of every store."""
    for seed in (0, 7, 123_456_789_012):
        ids = np.random.default_rng(seed).integers(0, vocab_size, 333)
        want, _ = perfect_source_topk(ids, k, vocab_size, seed=seed)
        np.testing.assert_array_equal(_core.perfect_topk_ids(ids, k, vocab_size, seed), want)


def test_a_texts_target_candidates_at_once_are_each_windows_own():
    """The target's own candidates of a text's windows, computed over the text at once, are each window's
    top-k renormalised over its kept entries (by hand), with empty slots (-1 ids, -inf log-probs) and a
    row with none left kept empty, and an empty window in between."""
    from fusekit.align.candidates import target_candidate, target_candidates
    from fusekit.store.types import Window

    def window(i, ids, logp):
        ids, logp = np.array(ids, np.int32).reshape(-1, 2), np.array(logp, np.float32).reshape(-1, 2)
        n = len(ids)
        return Window(0, i, 0, 0, np.zeros(n, np.int64), np.zeros(n, np.int64), ids, logp, np.full(n, 0.5, np.float32), 0.5)

    windows = [
        window(0, [[3, 1], [2, -1]], [[np.log(0.3), np.log(0.1)], [np.log(0.2), 0.0]]),
        window(1, [], []),
        window(2, [[5, 4], [-1, 7]], [[-np.inf, np.log(0.6)], [0.0, -np.inf]]),
    ]
    want_ids = [[[3, 1], [2, -1]], [], [[-1, 4], [-1, -1]]]
    want_probs = [[[0.75, 0.25], [1.0, 0.0]], [], [[0.0, 1.0], [0.0, 0.0]]]
    got = target_candidates(windows)
    assert len(got) == 3
    for w, c, ids, probs in zip(windows, got, want_ids, want_probs):
        assert c.ids.dtype == np.int32 and c.probs.dtype == np.float32 and c.ids.shape == (len(w.input_ids), 2)
        np.testing.assert_array_equal(c.ids.reshape(-1, 2), np.array(ids, np.int32).reshape(-1, 2))
        np.testing.assert_allclose(c.probs.reshape(-1, 2), np.array(probs, np.float32).reshape(-1, 2), rtol=1e-6)
        one = target_candidate(w)  # and exactly what the window alone gives
        np.testing.assert_array_equal(c.ids, one.ids)
        np.testing.assert_array_equal(c.probs, one.probs)
        np.testing.assert_array_equal(c.ce, one.ce)


# ---------------------------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def real_pair_stores(tmp_path_factory):
    """Tiny models on three real vocabularies (Llama-2 target; GPT-2 and Phi-3 sources), extracted in memory
    over texts of every hard kind, in 48-token windows; one text long enough to be transferred in several
    parallel row blocks."""
    from align_store_data import memory_store

    from fusekit import zoo

    root = tmp_path_factory.mktemp("real-pair-stores")
    long = " ".join(f"Sentence {i}: 東京 ☕ café, naïve — {i * 7919 % 1000} items.\r\n" for i in range(60))
    texts = [TEXTS[0], long, TEXTS[1], TEXTS[2], TEXTS[3], "Plain words, then digits 0123456789 and more words.\n" * 5]
    stores = {}
    for name, arch, seed in (("llama-spm", "llama", 1), ("gpt-2", "gpt2", 2), ("phi-3", "llama", 3)):
        tok = real_tokenizer(name)
        from transformers import AutoModelForCausalLM

        folder = zoo.build_tiny_model(arch, tok, root / name, seed=seed, hidden=16, layers=1)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        stores[name] = memory_store(model, tok, texts, k=4, max_length=48, name=name)
    return stores


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "timings.json"}


def test_the_aligned_store_does_not_depend_on_the_number_of_workers(real_pair_stores, tmp_path):
    """Every method (bytespan from GPT-2, fusellm and fusechat from Phi-3, onto Llama-2) at 1, 2 and 4
    workers: the same files, byte for byte (the fusechat counts are counted afresh each time)."""
    s = real_pair_stores
    outs = []
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        fusekit.run_align(
            s["llama-spm"], [s["gpt-2"], s["phi-3"], s["phi-3"]], out, num_shards=2, workers=workers,
            method=["bytespan", "fusellm", "fusechat"], vocab_map_cache=tmp_path / f"cache{workers}", progress=False,
        ).report
        outs.append(_files(out))
    assert outs[0].keys() == outs[1].keys() == outs[2].keys()
    assert any(name.startswith("fusechat-counts/") for name in outs[0])
    for name in outs[0]:
        assert outs[0][name] == outs[1][name] == outs[2][name], name
    from fusekit.store.aligned_store import AlignedStore

    report = AlignedStore(tmp_path / "w1").report
    bytespan, paper, stat = report["sources"]
    assert bytespan["perfect_source_recall"] > 0.9 and bytespan["bad_mass"] == 0.0
    assert paper["carried"] > 0 and stat["carried"] > 0


def test_the_file_does_not_depend_on_where_batches_are_cut(real_pair_stores, tmp_path):
    """A batch per text against batches of a row group: the same bytes and sidecar counts (report.json
    sums them in text order); one row group per window holds the same rows."""
    from fusekit.align.shard import ShardJob, align_shard
    from fusekit.align.stage import _source_map
    from fusekit.align.transfer import Method
    from fusekit.store.shards import read_manifest

    s = real_pair_stores
    target, sources = s["llama-spm"], [s["gpt-2"], s["phi-3"]]
    kw = dict(num_shards=1, workers=2, method=["bytespan", "fusellm"], vocab_map_cache=tmp_path / "c", progress=False)
    fusekit.run_align(target, sources, tmp_path / "a", **kw).report
    settings = dict(read_manifest(tmp_path / "a")["settings"], row_group_rows=4)  # several row groups
    vmaps = [_source_map(target, src, Method(m), tmp_path / "c", 2) for src, m in zip(sources, settings["methods"])]
    job = ShardJob(target, sources, vmaps, settings, 2)
    whole, texts = align_shard(job, 0), align_shard(job, 0, batch_rows=1)
    assert texts.data == whole.data and texts.info == whole.info
    small = align_shard(ShardJob(target, sources, vmaps, dict(settings, row_group_rows=1), 2), 0)
    assert pl.read_parquet(io.BytesIO(small.data)).equals(pl.read_parquet(io.BytesIO(whole.data)))
    assert small.info == whole.info and whole.info["rows"] > 8


def test_a_streamed_shard_holds_its_rows_and_one_row_group_is_todays_bytes():
    from fusekit.store.aligned_format import encode_shard, stream_shard

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40_000, 20)  # several data pages per row group

    def frame(lo: int, hi: int) -> pl.DataFrame:  # built for itself, as the shard's row groups are
        r = np.random.default_rng(lo)
        return pl.DataFrame([
            pl.Series("text_id", np.arange(lo, hi), dtype=pl.Int64),
            pl.Series("ids", [r.integers(-1, 9, n).astype(np.int32) for n in lengths[lo:hi]], dtype=pl.List(pl.Int32)).cast(pl.List(pl.Int32)),
        ])

    meta = {"b": "2", "a": "1"}
    buf = io.BytesIO()
    stream_shard(iter([frame(0, 20)]), frame(0, 1).schema, buf, 20, meta)
    assert buf.getvalue() == encode_shard(frame(0, 20), 20, meta)
    empty = io.BytesIO()
    stream_shard(iter([]), frame(0, 1).schema, empty, 8, meta)
    assert empty.getvalue() == encode_shard(frame(0, 0), 8, meta)
    groups = io.BytesIO()
    stream_shard(iter([frame(0, 8), frame(8, 16), frame(16, 20)]), frame(0, 1).schema, groups, 8, meta)
    assert pl.read_parquet(io.BytesIO(groups.getvalue())).equals(pl.concat([frame(0, 8), frame(8, 16), frame(16, 20)]))
    with pytest.raises(ValueError, match="one per row group"):
        stream_shard(iter([frame(0, 5), frame(5, 13)]), frame(0, 1).schema, io.BytesIO(), 8, meta)


# ---------------------------------------------------------------------------------------------- counts


def test_shard_jobs_share_one_count_pass(real_pair_stores, tmp_path):
    """Two `--shard I/2` jobs as on two machines (each its own vocabulary-map cache), one after the other:
    the second reads the counts the first left in the store; the store equals one whole run's."""
    s = real_pair_stores
    args = (_two_shard(s["llama-spm"]), [_two_shard(s["phi-3"])])  # a count pass of two parts
    kw = dict(method="fusechat", num_shards=2, workers=1, progress=False)
    fusekit.run_align(*args, tmp_path / "one", vocab_map_cache=tmp_path / "cache-one", **kw).report
    fusekit.run_align(*args, tmp_path / "jobs", shard="0/2", vocab_map_cache=tmp_path / "cache-a", **{**kw, "num_shards": None}).report
    counted = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs" / "fusechat-counts").iterdir()}
    assert len([n for n in counted if ".part-" in n]) == 2 and len(counted) == 3  # two parts and their total
    fusekit.run_align(*args, tmp_path / "jobs", shard="1/2", vocab_map_cache=tmp_path / "cache-b", **{**kw, "num_shards": None}).report
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs" / "fusechat-counts").iterdir()} == counted
    assert [p.name for p in (tmp_path / "cache-b").glob("*.counts.npz")]  # the second machine keeps a copy
    one, jobs = _files(tmp_path / "one"), _files(tmp_path / "jobs")
    assert one.keys() == jobs.keys()
    for name in one:
        assert one[name] == jobs[name], name
    from fusekit.store.shards import verify_store

    assert verify_store(tmp_path / "jobs") == []


def test_a_job_counts_free_parts_and_waits_for_the_others(real_pair_stores, tmp_path):
    """Another job holds part 0: this one counts part 1, waits, and takes part 0 as published."""
    from fusekit.align.inputs import info_of
    from fusekit.align.corpus_statmap import _corpus_identity, _window_pairs, corpus_counts, count_parts, counts_cache_key
    from fusekit.align.statmap import AlignmentCounts, count_alignments
    from fusekit.align.tokens import TokenTable
    from fusekit.align.vocab_cache import pair_digest
    from fusekit.store.lock import ShardLock

    target, source = _two_shard(real_pair_stores["llama-spm"]), _two_shard(real_pair_stores["phi-3"])
    shared = tmp_path / "shared"
    shared.mkdir()
    key = counts_cache_key(target, source)
    part0 = f"{key}.part-00000-of-00002.counts.npz"
    lock = ShardLock(shared, part0)
    assert lock.acquire()
    got = {}
    job = threading.Thread(target=lambda: got.update(result=corpus_counts(target, source, tmp_path / "cache", 1, shared)))
    job.start()
    for _ in range(600):
        if (shared / f"{key}.part-00001-of-00002.counts.npz").is_file():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    assert job.is_alive() and not (shared / part0).is_file()  # part 1 counted, part 0 awaited
    s_info, t_info = info_of(source), info_of(target)
    parts = count_parts(target)
    mine = count_alignments(TokenTable(list(source.vocab)), TokenTable(list(target.vocab)), _window_pairs(target, source, parts[:1]),
                            (len(s_info), len(t_info)), pair_digest(s_info, t_info))
    meta = {"corpus": _corpus_identity(target, source), "part": [0, 2], "texts": [parts[0].start, parts[0].stop]}
    (shared / part0).write_bytes(mine.to_bytes(meta))
    stamp = (shared / part0).stat().st_mtime_ns
    lock.release()
    job.join(60)
    assert not job.is_alive()
    counts, found = got["result"]
    assert not found and (shared / part0).stat().st_mtime_ns == stamp
    alone, _ = corpus_counts(target, source, tmp_path / "alone", 1)
    for name in ("src", "tgt", "count"):
        np.testing.assert_array_equal(getattr(counts, name), getattr(alone, name))
    assert AlignmentCounts.from_file(shared / f"{key}.counts.npz")[0].nnz == alone.nnz


def _two_shard(store):
    """The memory store as if extracted in two shards (the count pass has two parts)."""
    from dataclasses import replace

    out = replace(store, settings=dict(store.settings, num_shards=2))
    out.vocab_info = store.vocab_info
    return out
