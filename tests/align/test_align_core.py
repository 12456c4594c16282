"""The Rust alignment core against hand-worked examples and the slow reference in reference.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

import fusekit
from reference import align_topk as ref_align_topk
from reference import dtw_path, levenshtein, map_vocab as ref_map_vocab

ALPHABET = ["a", "b", "c", "ab", "ba", "abc", " ", " a", "é", "日本", "", "Ġ", "xyz", "aa"]


def random_tokens(rng: random.Random, max_len: int) -> list[str]:
    return [rng.choice(ALPHABET) + rng.choice(["", "", "b", "ß"]) for _ in range(rng.randint(1, max_len))]


def test_levenshtein_reference_is_right():
    # The reference must itself be trustworthy: textbook values.
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_hand_worked_path():
    # Source "hello world" as [hello, ' world'], target as [hel, lo, ' wor', ld].
    # cost matrix (rows: source):  hello: [2, 3, 5, 4]   ' world': [6, 5, 2, 4]
    # D: row1 = [2, 5, 10, 14]; row2 = [8, 7, 7, 11] → backtrack from (2,4): up/left/diag…
    path = fusekit.align_tokens(["hello", " world"], ["hel", "lo", " wor", "ld"])
    assert path.dtype == np.int64 and path.shape[1] == 2
    # (1,3): diag D[1][3]=10, up D[1][4]=14, left D[2][3]=7 → left to (2,3); (2,3): diag D[1][2]=5,
    # up D[1][3]=10, left D[2][2]=7 → diag to (1,2); (1,2): only left (row 0 is ∞) → (1,1).
    assert path.tolist() == [[0, 0], [0, 1], [1, 2], [1, 3]]


def test_ties_prefer_diagonal_then_up_then_left():
    # All costs equal: a diagonal walk as far as possible, then the remaining moves.
    assert fusekit.align_tokens(["x", "x"], ["x", "x"]).tolist() == [[0, 0], [1, 1]]
    # 3×1: only "up" moves exist.
    assert fusekit.align_tokens(["a", "b", "c"], ["abc"]).tolist() == [[0, 0], [1, 0], [2, 0]]
    # Equal-cost choice between up and left at (2,2) of a 2×2 with costs [[1,1],[1,1]]:
    # D = [[1,2],[2,2]]: from (2,2): diag D[1][1]=1 is the minimum → diagonal.
    assert fusekit.align_tokens(["p", "q"], ["r", "s"]).tolist() == [[0, 0], [1, 1]]


@pytest.mark.parametrize("seed", range(6))
def test_align_tokens_equals_reference_on_random_pairs(seed):
    rng = random.Random(seed)
    for _ in range(60):
        src, tgt = random_tokens(rng, 14), random_tokens(rng, 14)
        assert fusekit.align_tokens(src, tgt).tolist() == [list(p) for p in dtw_path(src, tgt)], (src, tgt)


def test_path_invariants_on_longer_pairs():
    rng = random.Random(7)
    for _ in range(20):
        src, tgt = random_tokens(rng, 120), random_tokens(rng, 120)
        path = fusekit.align_tokens(src, tgt)
        assert path[0].tolist() == [0, 0] and path[-1].tolist() == [len(src) - 1, len(tgt) - 1]
        steps = np.diff(path, axis=0)
        assert set(map(tuple, steps.tolist())) <= {(1, 1), (1, 0), (0, 1)}


def test_batch_equals_single_calls():
    rng = random.Random(3)
    pairs = [(random_tokens(rng, 40), random_tokens(rng, 40)) for _ in range(50)]
    singles = [fusekit.align_tokens(s, t) for s, t in pairs]
    for threads in (None, 1, 2):
        batch = fusekit.align_tokens_batch(pairs, threads=threads)
        assert len(batch) == len(singles)
        for a, b in zip(batch, singles):
            np.testing.assert_array_equal(a, b)


def test_align_ids_batch_equals_string_alignment():
    rng = random.Random(11)
    src_vocab = sorted(set(random_tokens(rng, 200)))
    tgt_vocab = sorted(set(random_tokens(rng, 200)))
    pairs, strings = [], []
    for _ in range(20):
        s = np.array([rng.randrange(len(src_vocab)) for _ in range(rng.randint(1, 30))])
        t = np.array([rng.randrange(len(tgt_vocab)) for _ in range(rng.randint(1, 30))])
        pairs.append((s, t))
        strings.append(([src_vocab[i] for i in s], [tgt_vocab[i] for i in t]))
    got = fusekit.align_ids_batch(fusekit.TokenTable(src_vocab), fusekit.TokenTable(tgt_vocab), pairs, threads=2)
    for path, (s, t) in zip(got, strings):
        assert path.tolist() == [list(p) for p in dtw_path(s, t)]


def test_map_vocab_hand_worked():
    tgt = ["the", "cat", "ca", "dog", "the"]
    src = ["the", "cats", "c", "dot", "zzzzzz", ""]
    # the → 0 (first duplicate); cats → cat; c → ca (1 edit) not cat (2); dot → dog;
    # zzzzzz is 6 edits from every target: lowest index 0; "" → ca (2 insertions).
    mapping, stats = fusekit.map_vocab_with_stats(src, tgt)
    assert mapping.tolist() == [0, 1, 2, 3, 0, 2]
    assert (stats.exact, stats.min_ed) == (1, 5)


@pytest.mark.parametrize("seed", range(3))
def test_map_vocab_equals_reference(seed):
    rng = random.Random(100 + seed)
    tgt = ["".join(rng.choice("abcé日 ") for _ in range(rng.randint(0, 6))) for _ in range(150)]
    src = ["".join(rng.choice("abcdé日 ") for _ in range(rng.randint(0, 8))) for _ in range(150)]
    assert fusekit.map_vocab(src, tgt, threads=2).tolist() == ref_map_vocab(src, tgt)


@pytest.mark.parametrize("seed", range(4))
def test_align_topk_equals_reference(seed):
    rng = np.random.default_rng(seed)
    v_src, v_tgt, k = 30, 25, 4
    vocab_map = rng.integers(0, v_tgt, v_src)
    src_ids = rng.integers(0, v_src, 20)
    # Make the target mostly agree with the mapped source so that positions are carried.
    tgt_ids = np.where(rng.random(20) < 0.7, vocab_map[src_ids], rng.integers(0, v_tgt, 20))[: rng.integers(5, 21)]
    path = fusekit.align_tokens([str(v) for v in vocab_map[src_ids]], [str(v) for v in tgt_ids])
    topk_ids = rng.integers(0, v_src, (20, k))
    logits = rng.normal(size=(20, k)).astype(np.float32)
    topk_logp = logits - np.log(np.exp(logits).sum(1, keepdims=True)) - 0.3  # kept mass < 1
    got = fusekit.align_topk(path, src_ids, tgt_ids, vocab_map, topk_ids, topk_logp)
    want = ref_align_topk(path.tolist(), src_ids.tolist(), tgt_ids.tolist(), vocab_map.tolist(),
                          topk_ids.tolist(), topk_logp.tolist())
    assert got.ids.shape == (len(tgt_ids), k)
    for j, (dist, carried) in enumerate(want):
        assert bool(got.carried[j]) == carried
        row = {int(i): float(p) for i, p in zip(got.ids[j], got.probs[j]) if i >= 0}
        assert row.keys() == dist.keys()
        for key in dist:
            assert row[key] == pytest.approx(dist[key], rel=1e-5)
        probs = got.probs[j][got.ids[j] >= 0]
        assert np.all(np.diff(probs) <= 1e-7), "entries ordered by decreasing probability"
    assert got.carried.any() and not got.carried.all()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        fusekit.align_tokens([], ["a"])
    with pytest.raises(ValueError, match="empty"):
        fusekit.align_tokens_batch([(["a"], ["b"]), (["a"], [])])
    with pytest.raises(TypeError, match=r"src\[1\]"):
        fusekit.align_tokens(["a", 3], ["a"])
    with pytest.raises(TypeError, match="single str"):
        fusekit.align_tokens("abc", ["a"])
    with pytest.raises(ValueError, match="empty"):
        fusekit.map_vocab(["a"], [])
    path = np.array([[0, 0], [1, 1]])
    ok = dict(path=path, src_ids=np.array([0, 1]), tgt_ids=np.array([0, 1]), vocab_map=np.array([0, 1]),
              src_topk_ids=np.zeros((2, 3), np.int64), src_topk_logp=np.zeros((2, 3), np.float32))
    fusekit.align_topk(**ok)
    with pytest.raises(ValueError, match="rows"):
        fusekit.align_topk(**{**ok, "src_topk_ids": np.zeros((3, 3), np.int64), "src_topk_logp": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="same shape"):
        fusekit.align_topk(**{**ok, "src_topk_logp": np.zeros((2, 2), np.float32)})
    with pytest.raises(TypeError, match="integer"):
        fusekit.align_topk(**{**ok, "src_topk_ids": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="outside"):
        fusekit.align_topk(**{**ok, "path": np.array([[0, 0], [5, 1]])})
    with pytest.raises(ValueError, match="vocabulary map"):
        fusekit.align_topk(**{**ok, "src_ids": np.array([0, 9])})
    with pytest.raises(ValueError, match="outside its vocabulary"):
        fusekit.align_ids_batch(fusekit.TokenTable(["a"]), fusekit.TokenTable(["b"]), [(np.array([0, 1]), np.array([0]))])
    with pytest.raises(ValueError, match="threads"):
        fusekit.align_tokens_batch([(["a"], ["b"])], threads=0)


def test_import_stays_light_and_subpackages_load_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, fusekit\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import fusekit pulled in torch'\n"
        "assert callable(fusekit.zoo.build_tiny_model) and callable(fusekit.transfer)\n"
        "try:\n    fusekit.no_such_thing\nexcept AttributeError as e:\n    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no attribute 'no_such_thing'" in run.stdout
