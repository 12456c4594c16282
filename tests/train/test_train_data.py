"""Packing windows into micro-batches: hand-worked plans, labels, and logits equal to unpacked windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusekit.store.types import AlignedWindow
from fusekit.train.data import DataPlan
from fusekit.train.examples import IGNORE, TrainDataError, window_example
from fusekit.train.rows import pack_rows
from fusekit.train.source import WindowSource, open_source
from fusion_data import random_window


def test_pack_rows_next_fit_by_hand():
    # Row of 10: [4] + [5] fit (9), [3] starts a new row, [12] is cut into 10 + 2, and the 2 joins [1].
    assert pack_rows([4, 5, 3, 12, 1], 10) == [
        [(0, 0, 4), (1, 0, 5)],
        [(2, 0, 3)],
        [(3, 0, 10)],
        [(3, 10, 12), (4, 0, 1)],
    ]
    # Pieces shorter than the row (a model context below max_length) still pack side by side.
    assert pack_rows([7], 10, piece_length=3) == [[(0, 0, 3), (0, 3, 6), (0, 6, 7)]]


def test_labels_are_next_tokens_and_loss_mask_marks_loss_tokens():
    w = AlignedWindow(0, 0, np.array([5, 6, 7, 8]), [])
    ex = window_example(w, "min_ce", "window", with_target=False)
    assert ex.labels.tolist() == [6, 7, 8, IGNORE]
    # Tokens 2 and 3 are assistant tokens: positions 1 and 2 predict them, so only they count.
    w.loss_mask = np.array([False, False, True, True])
    assert window_example(w, "min_ce", "window", with_target=False).labels.tolist() == [IGNORE, 7, 8, IGNORE]


def test_fused_target_is_zero_where_there_is_no_label():
    rng = np.random.default_rng(0)
    w = random_window(rng, n=6, k=3, vocab=50)
    w.loss_mask = np.array([True, True, False, True, True, True])
    ex = window_example(w, "avg_ce", "token", with_target=True)
    has_label = ex.labels != IGNORE
    assert has_label.tolist() == [True, False, True, True, True, False]
    assert np.all(ex.target_probs[~has_label] == 0)
    np.testing.assert_allclose(ex.target_probs[has_label].sum(1), 1.0, rtol=1e-5)


def windows_of_lengths(lengths, seed=0) -> list[AlignedWindow]:
    rng = np.random.default_rng(seed)
    return [random_window(rng, n=n, k=3, vocab=40, sources=1, text_id=i) for i, n in enumerate(lengths)]


def test_micro_batch_holds_each_label_once_across_an_epoch():
    windows = windows_of_lengths([5, 9, 3, 17, 4, 8, 2, 6])
    plan = DataPlan(WindowSource(windows), max_length=10, batch_size=2, grad_accum=1, epochs=1, seed=3)
    seen = []
    for i in range(plan.total_micro):
        b = plan.micro_batch(i)
        assert b.input_ids.shape[1] <= 10
        seen.append(int((b.labels != IGNORE).sum()))
    assert sum(seen) == sum(len(w.input_ids) - 1 for w in windows)


def test_step_to_micro_batch_mapping_matches_across_world_sizes():
    windows = windows_of_lengths([6] * 10)
    one = DataPlan(WindowSource(windows), max_length=6, batch_size=1, grad_accum=4, epochs=1)
    two = DataPlan(WindowSource(windows), max_length=6, batch_size=1, grad_accum=2, epochs=1, world_size=2)
    assert one.total_steps == two.total_steps == 3
    for step in range(3):
        merged = sorted(i for r in (0, 1) for i in two.micro_indices(step, r) if i is not None)
        assert merged == [i for i in one.micro_indices(step, 0) if i is not None]
    assert one.micro_indices(2, 0) == [8, 9, None, None]  # the last step runs short, padded with None


def test_fractional_epochs_and_shuffle_are_deterministic():
    windows = windows_of_lengths([4] * 12)
    kw = dict(max_length=4, batch_size=1, grad_accum=1, seed=5)
    plan = DataPlan(WindowSource(windows), epochs=1.5, **kw)
    assert plan.total_micro == 18
    again = DataPlan(WindowSource(windows), epochs=1.5, **kw)
    firsts = [plan.micro_batch(i).input_ids.tolist() for i in range(18)]
    assert firsts == [again.micro_batch(i).input_ids.tolist() for i in range(18)]
    assert firsts[12:] != firsts[:6]  # epoch 2 has its own order
    assert sorted(map(str, firsts[:12])) == sorted(str([w.input_ids.tolist()]) for w in windows)


class StreamOnly:
    """A store that can only stream (no random access): the plan reads it forward."""

    def __init__(self, windows):
        self.windows = windows
        self.passes = 0

    def iter_windows(self):
        self.passes += 1
        yield from self.windows


def test_streaming_store_gives_the_same_batches_in_order():
    windows = windows_of_lengths([5, 9, 3, 7, 4])
    stream = StreamOnly(windows)
    a = DataPlan(open_source(stream), max_length=10, batch_size=1, grad_accum=1, epochs=2, shuffle=True)
    b = DataPlan(open_source(windows), max_length=10, batch_size=1, grad_accum=1, epochs=2, shuffle=False)
    assert not a.shuffle  # no random access: stream order
    for i in range(a.total_micro):
        x, y = a.micro_batch(i), b.micro_batch(i)
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.target_probs, y.target_probs)


def test_empty_or_wrong_data_is_a_clear_error(tmp_path):
    with pytest.raises(TrainDataError, match="no windows"):
        DataPlan(open_source([]), max_length=8, batch_size=1, grad_accum=1, epochs=1)
    with pytest.raises(TrainDataError, match="expected AlignedWindow"):
        open_source([{"input_ids": [1, 2]}])
    with pytest.raises(TrainDataError, match="no aligned store"):
        open_source(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_rows_give_the_logits_of_separate_windows(arch, tokenizers_by_kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusekit import zoo

    tok = tokenizers_by_kind["bpe"]
    path = zoo.build_tiny_model(arch, tok, tmp_path / arch, hidden=32)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    windows = windows_of_lengths([9, 5, 7, 3])
    for w in windows:
        w.input_ids = w.input_ids % len(tok)
    plan = DataPlan(WindowSource(windows), max_length=16, batch_size=2, grad_accum=1, epochs=1, shuffle=False)
    batch = plan.micro_batch(0)  # rows [9 + 5] and [7 + 3]
    with torch.no_grad():
        packed = model(
            input_ids=torch.as_tensor(batch.input_ids), position_ids=torch.as_tensor(batch.position_ids), use_cache=False
        ).logits
        for row, (first, second) in enumerate([(0, 1), (2, 3)]):
            at = 0
            for w in (windows[first], windows[second]):
                alone = model(input_ids=torch.as_tensor(w.input_ids)[None], use_cache=False).logits[0]
                n = len(w.input_ids)
                torch.testing.assert_close(packed[row, at : at + n], alone, rtol=1e-5, atol=1e-5)
                at += n
