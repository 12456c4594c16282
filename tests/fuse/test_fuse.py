"""Fusion rules and the sparse merge, against hand-worked examples and a slow dict-based reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusekit.fuse import FUSION_RULES, FusionError, fuse_window, fusion_weights, merge_weighted, register_fusion
from fusekit.store.types import AlignedWindow, Candidate
from fusion_data import random_window


def cand(ids, probs, ce, mean_ce) -> Candidate:
    return Candidate(
        ids=np.array(ids, dtype=np.int32),
        probs=np.array(probs, dtype=np.float32),
        ce=np.array(ce, dtype=np.float32),
        mean_ce=mean_ce,
    )


def as_dict(ids_row, probs_row) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(ids_row, probs_row) if i >= 0}


# Three positions, k = 2: the target and two sources with hand-picked CEs.
NAN = float("nan")
TARGET = cand([[1, 2], [3, 4], [5, 6]], [[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], [2.0, 1.0, NAN], 1.5)
SRC_A = cand([[2, 7], [3, 8], [5, 9]], [[0.5, 0.5], [0.7, 0.3], [1.0, 0.0]], [1.0, NAN, NAN], 1.0)
SRC_B = cand([[1, -1], [4, 3], [6, 5]], [[1.0, 0.0], [0.8, 0.2], [0.5, 0.5]], [3.0, 0.5, NAN], 2.0)
WINDOW = AlignedWindow(text_id=0, window=0, input_ids=np.array([10, 11, 12]), candidates=[TARGET, SRC_A, SRC_B])


def test_min_ce_window_picks_lowest_mean_ce():
    fused = fuse_window(WINDOW, "min_ce", "window")
    # SRC_A has the lowest window mean CE (1.0): its distribution, zero-probability slots dropped.
    assert [as_dict(i, p) for i, p in zip(fused.ids, fused.probs)] == [
        {2: 0.5, 7: 0.5},
        {3: pytest.approx(0.7), 8: pytest.approx(0.3)},
        {5: 1.0},
    ]


def test_min_ce_token_picks_lowest_ce_per_position_and_never_a_fallback():
    weights = fusion_weights(WINDOW, "min_ce", "token")
    # pos 0: CEs (2, 1, 3) → A. pos 1: (1, NaN, 0.5) → B. pos 2: all NaN → the target.
    np.testing.assert_array_equal(weights, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    # A fallback (NaN) is never preferred over a real candidate, however high the real CE.
    w = AlignedWindow(0, 0, np.array([1, 2]), [cand([[1], [1]], [[1.0], [1.0]], [50.0, NAN], 50.0),
                                             cand([[2], [2]], [[1.0], [1.0]], [NAN, NAN], NAN)])
    np.testing.assert_array_equal(fusion_weights(w, "min_ce", "token"), [[1, 0], [1, 0]])


def test_min_ce_ties_go_to_the_target():
    w = AlignedWindow(0, 0, np.array([1, 2]), [cand([[1], [1]], [[1.0], [1.0]], [1.0, NAN], 1.0),
                                             cand([[2], [2]], [[1.0], [1.0]], [1.0, NAN], 1.0)])
    np.testing.assert_array_equal(fusion_weights(w, "min_ce", "window"), [[1, 0], [1, 0]])
    np.testing.assert_array_equal(fusion_weights(w, "min_ce", "token")[0], [1, 0])


def test_avg_ce_window_weights_by_formula():
    # softmax(exp(−CE)) over the window means 1.5, 1.0, 2.0, worked out with math.
    scores = [math.exp(math.exp(-c)) for c in (1.5, 1.0, 2.0)]
    expected = [s / sum(scores) for s in scores]
    weights = fusion_weights(WINDOW, "avg_ce", "window")
    for row in weights:
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    # The blended distribution at position 0, id by id: id 1 from target and B, id 2 from target and A.
    fused = fuse_window(WINDOW, "avg_ce", "window")
    wt, wa, wb = expected
    got = as_dict(fused.ids[0], fused.probs[0])
    want = {1: 0.6 * wt + 1.0 * wb, 2: 0.4 * wt + 0.5 * wa, 7: 0.5 * wa}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6)


def test_fused_mass_is_the_chosen_or_blended_candidates_mass():
    """MinCE takes the chosen candidate's kept mass; AvgCE the weighted mean of the candidates' masses; a
    candidate that records none (a version-2 store) counts 1 on each row with probability, 0 on an empty one."""
    masses = [np.array([0.8, 0.7, 0.9], np.float32), np.array([0.6, 1.0, 0.5], np.float32), None]
    cands = [Candidate(c.ids, c.probs, c.ce, c.mean_ce, m) for c, m in zip((TARGET, SRC_A, SRC_B), masses)]
    window = AlignedWindow(0, 0, np.array([10, 11, 12]), cands)
    # MinCE passes the chosen candidate's float32 mass through exactly.
    np.testing.assert_array_equal(fuse_window(window, "min_ce", "window").mass, np.float32([0.6, 1.0, 0.5]))  # SRC_A
    # token MinCE: A, then B (no mass recorded: 1), then the target.
    np.testing.assert_array_equal(fuse_window(window, "min_ce", "token").mass, np.float32([0.6, 1.0, 0.9]))
    scores = [math.exp(math.exp(-c)) for c in (1.5, 1.0, 2.0)]
    wt, wa, wb = (x / sum(scores) for x in scores)
    want = [0.8 * wt + 0.6 * wa + 1.0 * wb, 0.7 * wt + 1.0 * wa + 1.0 * wb, 0.9 * wt + 0.5 * wa + 1.0 * wb]
    fused = fuse_window(window, "avg_ce", "window")
    np.testing.assert_allclose(fused.mass, want, rtol=1e-6)
    # The probabilities are FuseLLM's blend of renormalised rows, whatever the masses.
    np.testing.assert_array_equal(fused.probs, fuse_window(WINDOW, "avg_ce", "window").probs)
    empty = Candidate(np.array([[3], [-1]], np.int32), np.array([[1.0], [0.0]], np.float32), np.array([1.0, NAN], np.float32), 1.0)
    np.testing.assert_array_equal(fuse_window(AlignedWindow(0, 0, np.array([1, 3]), [empty])).mass, [1.0, 0.0])
    with pytest.raises(FusionError, match="mass"):
        fuse_window(AlignedWindow(0, 0, np.array([1, 3]), [Candidate(empty.ids, empty.probs, empty.ce, 1.0, np.ones(3, np.float32))]))


def test_avg_ce_token_leaves_fallbacks_out():
    weights = fusion_weights(WINDOW, "avg_ce", "token")
    s = [math.exp(math.exp(-c)) for c in (2.0, 1.0, 3.0)]
    np.testing.assert_allclose(weights[0], [x / sum(s) for x in s], rtol=1e-12)
    s = [math.exp(math.exp(-1.0)), math.exp(math.exp(-0.5))]
    np.testing.assert_allclose(weights[1], [s[0] / sum(s), 0.0, s[1] / sum(s)], rtol=1e-12)
    np.testing.assert_array_equal(weights[2], [1, 0, 0])


def reference_merge(window: AlignedWindow, weights: np.ndarray) -> list[dict[int, float]]:
    rows = []
    for t in range(len(window.input_ids)):
        acc: dict[int, float] = {}
        for c, cand_ in enumerate(window.candidates):
            for i, p in zip(cand_.ids[t], cand_.probs[t]):
                if i >= 0 and weights[t, c] * p > 0:
                    acc[int(i)] = acc.get(int(i), 0.0) + float(weights[t, c]) * float(p)
        rows.append(acc)
    return rows


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce"])
@pytest.mark.parametrize("granularity", ["window", "token"])
def test_merge_matches_slow_reference(fusion, granularity):
    rng = np.random.default_rng(7)
    for trial in range(5):
        window = random_window(rng, n=33, k=6, vocab=12, sources=3)  # a small vocab: many shared ids
        weights = fusion_weights(window, fusion, granularity)
        fused = fuse_window(window, fusion, granularity)
        k_total = sum(c.ids.shape[1] for c in window.candidates)
        assert fused.ids.shape[1] <= k_total and fused.ids.dtype == np.int32
        for t, want in enumerate(reference_merge(window, weights)):
            got = as_dict(fused.ids[t], fused.probs[t])
            assert len(got) == int((fused.ids[t] >= 0).sum()), "an id appears twice in one row"
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[i] for i in sorted(got)], [want[i] for i in sorted(want)], rtol=1e-6)
            assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)


def test_merge_with_distinct_supports_keeps_every_slot():
    a = [np.array([[0, 1]]), np.array([[2, 3]]), np.array([[4, 5]])]
    p = [np.array([[0.5, 0.5]])] * 3
    fused = merge_weighted(a, p, np.full((1, 3), 1 / 3))
    assert sorted(fused.ids[0].tolist()) == [0, 1, 2, 3, 4, 5]  # k·(K+1) non-zeros: the upper bound


def test_a_new_rule_is_one_function():
    @register_fusion("target_only_test", "Target only")
    def target_only(ce):
        w = np.zeros_like(ce)
        w[..., 0] = 1.0
        return w

    try:
        fused = fuse_window(WINDOW, "target_only_test", "token")
        assert as_dict(fused.ids[0], fused.probs[0]) == {1: pytest.approx(0.6), 2: pytest.approx(0.4)}
    finally:
        del FUSION_RULES["target_only_test"]


def test_bad_input_is_a_clear_error():
    with pytest.raises(FusionError, match="unknown fusion rule 'max_ce'"):
        fuse_window(WINDOW, "max_ce")
    with pytest.raises(FusionError, match="granularity"):
        fuse_window(WINDOW, "min_ce", "sentence")
    broken = AlignedWindow(0, 0, np.array([1, 2, 3, 4]), [TARGET])
    with pytest.raises(FusionError, match="do not match 4 positions"):
        fuse_window(broken)


def test_a_candidate_taken_whole_keeps_its_slots_and_still_sums_a_repeated_id():
    # MinCE at window level takes candidate 1 whole: its own slots (an empty one stays empty) …
    ids = [np.array([[3, 4, 5]]), np.array([[7, -1, 2]])]
    probs = [np.array([[0.2, 0.3, 0.5]]), np.array([[0.6, 0.0, 0.4]])]
    fused = merge_weighted(ids, probs, np.array([[0.0, 1.0]]))
    assert as_dict(fused.ids[0], fused.probs[0]) == pytest.approx({7: 0.6, 2: 0.4})
    # … and where an id repeats within a position (never in a store: alignment sums collisions), it is summed.
    fused = merge_weighted([np.array([[7, 7, 2]])], [np.array([[0.3, 0.3, 0.4]])], np.array([[1.0]]))
    assert as_dict(fused.ids[0], fused.probs[0]) == pytest.approx({7: 0.6, 2: 0.4})
    assert int((fused.ids[0] == 7).sum()) == 1
