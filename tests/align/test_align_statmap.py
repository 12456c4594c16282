"""The `fusechat` method: FuseChat's statistical vocabulary map (counts of tokens that begin together on
the DTW alignment over the corpus), then FuseLLM's 1:1 carry through it (fusekit/align/statmap.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

import fusekit
from fusekit.align.recall import perfect_source_topk, recalled
from fusekit.align.statmap import AlignmentCounts, co_start_pairs, count_texts, statistical_vocab_map
from fusekit.align.transfer import encode_offsets
from fusekit.vocab.info import vocab_info
from fusekit.store.aligned_store import AlignedStore
from fusekit.store.types import Window
from align_store_data import MemoryExtractStore
from real_tokenizers import real_tokenizer
import reference

TEXT = "hello xyz hello xyz"


def _store(name: str, vocab: list[str], ids: list[int], starts: list[int], topk_ids, topk_p) -> MemoryExtractStore:
    """One text in one window, plain token strings (no normalisation)."""
    n = len(ids)
    ce = np.r_[np.full(n - 1, 0.5), np.nan].astype(np.float32)
    w = Window(
        text_id=0, window=0, char_start=0, char_end=len(TEXT),
        input_ids=np.array(ids, np.int64), offsets=np.array(starts, np.int64),
        topk_ids=np.array(topk_ids, np.int32), topk_logp=np.log(np.array(topk_p, np.float32)),
        ce=ce, mean_ce=0.5, text=TEXT,
    )
    settings = {"model": name, "tokenizer_fingerprint": f"tok-{name}", "corpus_fingerprint": "c1", "k": 2, "max_length": 64, "vocab_size": len(vocab)}
    return MemoryExtractStore(settings=settings, vocab=vocab, scheme="plain", texts={0: [w]}, n_texts=1)


@pytest.fixture
def hand_stores():
    """text "hello xyz hello xyz".

    target "hello"|" x"|"yz"|" hello"|" x"|"yz" (vocabulary hello, " hello", " x", yz, " xyzq");
    source "hello"|" xyz"|" hello"|" xyz"          (vocabulary hello, " xyz", " hello").
    DTW pairs (0,0) (1,1) (1,2) (2,3) (3,4) (3,5); the pairs that begin together (diagonal steps) are
    hello–hello, " xyz"–" x", " hello"–" hello", " xyz"–" x": counts {hello: hello 1, " xyz": " x" 2,
    " hello": " hello" 1}. FuseLLM's map sends " xyz" to " xyzq" (edit distance 1 beats " x" and "yz",
    2); the statistical map sends it to " x", the piece the target begins it with.
    """
    tv = ["hello", " hello", " x", "yz", " xyzq"]
    sv = ["hello", " xyz", " hello"]
    target = _store("tgt", tv, [0, 2, 3, 1, 2, 3], [0, 5, 7, 9, 15, 17], [[2, 3]] * 6, [[0.5, 0.5]] * 6)
    # Source rows: after hello → " xyz" 0.7, " hello" 0.2; after " xyz" → " hello" 0.6, hello 0.3;
    # after " hello" → " xyz" 0.5, hello 0.4; the last row → hello, " hello".
    source = _store("src", sv, [0, 1, 2, 1], [0, 5, 9, 15], [[1, 2], [2, 0], [1, 0], [0, 2]], [[0.7, 0.2], [0.6, 0.3], [0.5, 0.4], [0.5, 0.5]])
    return target, source


def test_hand_worked_statistical_map(hand_stores, tmp_path):
    target, source = hand_stores
    reports = {
        m: fusekit.run_align(target, [source], tmp_path / m, vocab_map_cache=tmp_path / "cache", method=m, progress=False).report["sources"][0]
        for m in ("fusellm", "fusechat")
    }
    (counts_file,) = (tmp_path / "cache").glob("*.counts.npz")
    counts, meta = AlignmentCounts.from_file(counts_file)
    assert list(zip(counts.src.tolist(), counts.tgt.tolist(), counts.count.tolist())) == [(0, 0, 1), (1, 2, 2), (2, 1, 1)]
    assert counts.shape == (3, 5) and meta["corpus"]["corpus_fingerprint"] == "c1"

    paper = AlignedStore(tmp_path / "fusellm")[0].candidates[1]
    stat = AlignedStore(tmp_path / "fusechat")[0].candidates[1]
    # Row 0 (after "hello") carries the source's row 0 in both: 0.7 / 0.2 renormalised to 7/9, 2/9; " xyz"
    # lands on " xyzq" (4) with FuseLLM's map, on " x" (2) with the statistical one.
    np.testing.assert_array_equal(paper.ids[0], [4, 1])
    np.testing.assert_array_equal(stat.ids[0], [2, 1])
    np.testing.assert_allclose(stat.probs[0], [7 / 9, 2 / 9], atol=1e-3)
    # Row 3 (after " hello") carries source row 2: " xyz" 5/9, hello 4/9.
    np.testing.assert_array_equal(stat.ids[3], [2, 0])
    np.testing.assert_allclose(stat.probs[3], [5 / 9, 4 / 9], atol=1e-3)
    # Rows 1, 2, 4 sit in 1:n groups (" xyz" over " x", "yz"): one-hot on the next target token. Row 1 maps
    # " xyz" → " x" like the target token, but " xyz" also covers "yz": not 1:1, so it must not carry.
    for row, nxt in ((1, 3), (2, 1), (4, 3)):
        np.testing.assert_array_equal(stat.ids[row], [nxt, -1])
    np.testing.assert_allclose(stat.ce[[0, 3]], [0.5, 0.5])
    assert np.isnan(stat.ce[[1, 2, 4]]).all()
    # Perfect-source recall: rows 0 and 3 of 5 with the statistical map, none with FuseLLM's.
    assert reports["fusechat"]["carried"] == reports["fusellm"]["carried"] == 2
    assert reports["fusechat"]["recalled"] == 2 and reports["fusellm"]["recalled"] == 0
    assert reports["fusechat"]["method"] == "fusechat"
    vm = reports["fusechat"]["vocab_map"]
    assert vm["statistical"] == 3 and vm["count_pairs"] == 3 and vm["counted"] == 4


def test_map_rule_ties_fallback_and_roles():
    """argmax count; ties to the identical string, then the lowest id; unseen → the fallback; counts on
    ids that must take no mass are ignored; special tokens by role."""
    from fusekit.vocab.info import EMPTY, SPECIAL, TEXT, VocabInfo

    src = VocabInfo(["ab", "c", "d", "e", "</s>", ""], np.array([TEXT] * 4 + [SPECIAL, EMPTY], np.uint8), 4)
    tgt = VocabInfo(["a", "ab", "c", "<unk>", "</s>"], np.array([TEXT] * 3 + [SPECIAL, SPECIAL], np.uint8), 4)
    counts = AlignmentCounts.from_pairs(
        [0, 0, 0, 0, 1, 1, 2, 4, 5, 3, 3, 3],
        [0, 0, 1, 1, 0, 2, 3, 0, 0, 3, 3, 3],
        (6, 5),
    )
    fallback = np.array([1, 2, 2, 0, 4, -1])
    ids, seen = statistical_vocab_map(counts, src, tgt, fallback)
    # ab: a 2, ab 2 → the identical string ab; c: a 1, c 1 → identical c; d: only <unk> (special) → fallback;
    # e: only <unk> → fallback; </s> → </s> by role; the empty id nowhere.
    assert ids.tolist() == [1, 2, 2, 0, 4, -1]
    assert seen.tolist() == [True, True, False, False, False, False]
    counts2 = AlignmentCounts.from_pairs([1, 1, 1], [0, 0, 2], (6, 5))
    assert statistical_vocab_map(counts2, src, tgt, fallback)[0][1] == 0  # a (2) beats the identical c (1)


def test_counts_match_a_slow_reference_and_stay_sparse():
    """Counts over real text (GPT-2 → Llama-2) against pure-Python DTW and Counter; storage is one triple
    per distinct pair, never the dense table."""
    from fusekit.align.probe_texts import probe_texts

    src_tok, tgt_tok = real_tokenizer("gpt-2"), real_tokenizer("llama-spm")
    texts = [t[:200] for kind in probe_texts().values() for t in kind[:2]]
    counts = count_texts(texts, src_tok, tgt_tok)
    s_info, t_info = vocab_info(src_tok), vocab_info(tgt_tok)
    want: Counter = Counter()
    for text in texts:
        s, t = encode_offsets(src_tok, text).ids, encode_offsets(tgt_tok, text).ids
        path = reference.dtw_path([s_info.strings[i] for i in s], [t_info.strings[j] for j in t])
        seen_i, seen_j = set(), set()
        for i, j in path:
            if i not in seen_i and j not in seen_j:
                want[(int(s[i]), int(t[j]))] += 1
            seen_i.add(i)
            seen_j.add(j)
    got = dict(zip(zip(counts.src.tolist(), counts.tgt.tolist()), counts.count.tolist()))
    assert got == dict(want)
    assert counts.shape == (len(s_info), len(t_info))
    assert counts.src.shape == counts.tgt.shape == counts.count.shape == (len(want),)
    assert counts.nnz < 2000 < len(s_info) * len(t_info) // 1000
    keys = counts.src.astype(np.int64) * counts.shape[1] + counts.tgt
    assert (np.diff(keys) > 0).all()  # sorted, one entry per pair
    assert counts.merged(counts).count.tolist() == (2 * counts.count).tolist()
    assert len(counts.to_bytes({})) < 2_000 + 32 * counts.nnz  # bytes ∝ distinct pairs


def _recall(src_tok, tgt_tok, texts, method, counts=None) -> float:
    hits = total = 0
    for text in texts:
        src, tgt = encode_offsets(src_tok, text), encode_offsets(tgt_tok, text)
        ids, logp = perfect_source_topk(src.ids, 8, len(src_tok))
        out = fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method=method, counts=counts)
        r = recalled(out, tgt.ids)
        hits, total = hits + int(r.sum()), total + len(r)
    return hits / total


@pytest.mark.parametrize("pair", [("gpt-2", "llama-spm"), ("mpt", "llama-spm")])
def test_perfect_source_recall_beats_the_paper_map(pair):
    """Counted over the probe texts themselves (as `fusekit align` counts over its corpus). The 1:1-both-ways
    condition only removes carries, yet the map more than makes up for it (GPT-2 → Llama-2, all probe
    texts: 0.525 against 0.487, benchmarks/bench_transfer.py)."""
    from fusekit.align.probe_texts import probe_texts

    src_tok, tgt_tok = real_tokenizer(pair[0]), real_tokenizer(pair[1])
    texts = [t for kind in probe_texts().values() for t in kind[:3]]
    counts = count_texts(texts, src_tok, tgt_tok)
    stat = _recall(src_tok, tgt_tok, texts, "fusechat", counts)
    paper = _recall(src_tok, tgt_tok, texts, "fusellm")
    assert stat >= paper


def test_text_api_counts_and_bad_counts():
    src_tok, tgt_tok = real_tokenizer("gpt-2"), real_tokenizer("llama-spm")
    text = "Tokenizers disagree: unbelievable, 12345 and naïve."
    src = encode_offsets(src_tok, text)
    ids, logp = perfect_source_topk(src.ids, 4, len(src_tok))
    own = fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method="fusechat")  # counted over the text itself
    given = fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method="fusechat", counts=count_texts([text], src_tok, tgt_tok))
    np.testing.assert_array_equal(own.ids, given.ids)
    assert own.carried.any()
    # A source spreading mass over special and random ids: nothing lands on Llama-2's twins or specials.
    t_info = vocab_info(tgt_tok)
    spread = ids.copy()
    spread[:, 1] = src_tok.eos_token_id
    spread[:, 2:] = np.random.default_rng(0).integers(0, len(src_tok), (len(ids), 2))
    out = fusekit.transfer(text, src_tok, tgt_tok, spread, logp, method="fusechat")
    bad = t_info.twin | (t_info.kind >= 2)  # SPECIAL, EMPTY
    bad[t_info.eos] = False
    live = out.ids >= 0
    assert live.any() and not bad[out.ids[live]].any()
    assert (out.ids[out.carried] == tgt_tok.eos_token_id).any()  # EOS by role
    other = count_texts([text], tgt_tok, src_tok)  # the reverse pair
    with pytest.raises(ValueError, match="another tokenizer pair"):
        fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method="fusechat", counts=other)
    with pytest.raises(TypeError, match="AlignmentCounts"):
        fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method="fusechat", counts={"a": 1})
    with pytest.raises(ValueError, match="for the fusechat method"):
        fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method="fusellm", counts=other)


def test_co_start_pairs_by_hand():
    # 1:n (source 0 over targets 0, 1), n:1 (sources 1, 2 on target 2), then 1:1.
    path = np.array([[0, 0], [0, 1], [1, 2], [2, 2], [3, 3]])
    s, t = co_start_pairs(path, np.array([10, 11, 12, 13]), np.array([20, 21, 22, 23]))
    assert list(zip(s.tolist(), t.tolist())) == [(10, 20), (11, 22), (13, 23)]


# ---------------------------------------------------------------------------------------------- stores, CLI


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory, tokenizers_by_kind, corpus_texts):
    """A byte-level BPE target and a Unigram source, tiny models, extracted by `fusekit.extract`."""
    from fusekit import zoo

    root = tmp_path_factory.mktemp("statmap")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:600]}) + "\n" for t in corpus_texts[:4]), encoding="utf-8")
    stores = {}
    for kind, arch in (("bpe", "gpt2"), ("unigram", "llama")):
        model = zoo.build_tiny_model(arch, tokenizers_by_kind[kind], root / f"model-{kind}", seed=0, hidden=32)
        stores[kind] = fusekit.run_extract(str(model), corpus, root / f"x-{kind}", top_k=4, max_length=64, num_shards=2, progress=False).out
    return root, stores


def test_cli_method_fusechat_end_to_end(tiny_stores, tmp_path):
    from fusekit.cli import app

    root, stores = tiny_stores
    cache = tmp_path / "cache"
    args = ["align", "-t", str(stores["bpe"]), "-s", str(stores["unigram"]), "-s", str(stores["unigram"]), "--vocab-map-cache", str(cache)]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a"), "-M", "fusechat", "-M", "fusellm", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    stat, paper = report["sources"]
    assert (stat["method"], paper["method"]) == ("fusechat", "fusellm")
    assert stat["bad_mass"] == 0.0 and stat["carried"] > 0
    assert stat["vocab_map"]["statistical"] > 0 and stat["vocab_map"]["count_pairs"] > 0
    assert stat["perfect_source_recall"] >= paper["perfect_source_recall"]
    (counts_file,) = cache.glob("*.counts.npz")
    counts, _ = AlignmentCounts.from_file(counts_file)
    assert counts.nnz == stat["vocab_map"]["count_pairs"]
    # Rows that hold entries are distributions (float16 in the store).
    store = AlignedStore(tmp_path / "a")
    for i in range(len(store)):
        cand = store[i].candidates[1]
        live = cand.probs.sum(axis=1) > 0
        np.testing.assert_allclose(cand.probs[live].sum(axis=1), 1.0, atol=1e-2)

    # A second run reads the counts back; a counts file of another pair at this key is rebuilt, not trusted.
    stamp = counts_file.stat().st_mtime_ns
    again = fusekit.run_align(stores["bpe"], [stores["unigram"]], tmp_path / "b", vocab_map_cache=cache, method="fusechat", progress=False).report
    assert counts_file.stat().st_mtime_ns == stamp
    assert again["sources"][0]["recalled"] == stat["recalled"]
    counts_file.write_bytes(AlignmentCounts.from_pairs([0], [1], (3, 5), pair="another pair").to_bytes({"corpus": {}}))
    rebuilt = fusekit.run_align(stores["bpe"], [stores["unigram"]], tmp_path / "c", vocab_map_cache=cache, method="fusechat", progress=False).report
    assert rebuilt["sources"][0]["recalled"] == stat["recalled"]
    assert AlignmentCounts.from_file(counts_file)[0].nnz == counts.nnz
    counts_file.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a fusekit alignment-counts file"):
        AlignmentCounts.from_file(counts_file)


def test_recipe_and_unknown_method(hand_stores, tmp_path):
    from fusekit.recipe import AlignOptions, ModelSpec
    from fusekit.store.errors import StoreError

    assert AlignOptions(method="fusechat").method == "fusechat"
    assert ModelSpec(name="a", model="m", align_method="fusechat").align_method == "fusechat"
    target, source = hand_stores
    with pytest.raises(StoreError, match="fusechat"):
        fusekit.run_align(target, [source], tmp_path / "x", method="fusechatt", progress=False).report


def test_summing_parts_equals_counting_once():
    rng = np.random.default_rng(1)
    s, t = rng.integers(0, 50, 5000), rng.integers(0, 70, 5000)
    whole = AlignmentCounts.from_pairs(s, t, (50, 70))
    parts = [AlignmentCounts.from_pairs(s[lo : lo + 700], t[lo : lo + 700], (50, 70)) for lo in range(0, 5000, 700)]
    summed = AlignmentCounts.summed(parts)
    assert summed.total == 5000 and summed.nnz == len(set(zip(s.tolist(), t.tolist())))
    for name in ("src", "tgt", "count"):
        np.testing.assert_array_equal(getattr(summed, name), getattr(whole, name))
    with pytest.raises(ValueError, match="different tokenizer pairs"):
        AlignmentCounts.summed([whole, AlignmentCounts.empty((50, 71))])
