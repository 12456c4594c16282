"""The streaming data path on a real aligned store: row-group shuffle, exact resume, disjoint DDP ranks,
worker processes, verification stamps, padding-free token counts, and packing only where it is safe."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fusekit.store.aligned_store as aligned_store
from fusekit.store.aligned_format import write_windows
from fusekit.store.aligned_store import AlignedStore
from fusekit.store.errors import StoreError
from fusekit.train.data import DataPlan
from fusekit.train.examples import IGNORE, window_example
from fusekit.train.rows import collate
from fusekit.train.source import open_source
from fusion_data import random_window

GROUP = 6  # windows per row group: small, so that a few dozen windows make many groups


def marked_windows(n: int, seed: int = 0) -> list:
    """Windows of uneven length whose first token is their own index: a batch says which windows it holds."""
    rng = np.random.default_rng(seed)
    windows = [random_window(rng, n=int(length), k=3, vocab=40, sources=2, text_id=i) for i, length in enumerate(rng.integers(4, 15, n))]
    for i, w in enumerate(windows):
        w.input_ids[0] = 1000 + i
    return windows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    windows = marked_windows(70)
    folder = write_windows(tmp_path_factory.mktemp("stream") / "aligned", windows, [3, 3, 3], num_shards=3,
                           settings={"row_group_rows": GROUP})
    return folder, windows


def plan_of(folder, **kw) -> DataPlan:
    options = dict(max_length=16, batch_size=2, grad_accum=1, epochs=2, seed=3, buffer_groups=3)
    return DataPlan(open_source(folder), **{**options, **kw})


def window_ids(batch) -> list[int]:
    """The windows of a packed batch, by their marker tokens (each window starts where its positions restart)."""
    starts = (batch.position_ids == 0) & (batch.input_ids >= 1000)
    return sorted(int(i) - 1000 for i in batch.input_ids[starts])


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "position_ids", "labels", "target_ids", "target_probs"))


def test_each_row_group_is_decoded_once_per_epoch_and_a_resumed_plan_reads_the_same_batches(store):
    folder, windows = store
    plan = plan_of(folder)
    groups = len(plan.source.groups()) - 1
    assert groups == 12  # 70 windows in 3 shards of 23–24, 4 groups of ≤ 6 each
    # The order is buffers of 3 whole row groups: all windows of one buffer before any of the next.
    group_of = np.searchsorted(plan.source.groups(), plan.order(0), side="right") - 1
    by_first_use = sorted(set(group_of.tolist()), key=lambda g: np.flatnonzero(group_of == g)[0])
    spans = [np.flatnonzero(np.isin(group_of, by_first_use[b : b + 3])) for b in range(0, groups, 3)]
    assert all(a.max() < b.min() for a, b in zip(spans, spans[1:]))
    assert sorted(plan.order(0).tolist()) == list(range(len(windows)))
    batches = [plan.micro_batch(i) for i in range(plan.total_micro)]
    assert plan.groups_read == 2 * groups  # never a row group decoded for one window
    per_epoch = plan.micro_per_epoch[0]
    for epoch in (0, 1):
        seen = [w for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for w in window_ids(b)]
        assert sorted(seen) == list(range(len(windows)))  # every window once per epoch
    assert [window_ids(b) for b in batches[:per_epoch]] != [window_ids(b) for b in batches[per_epoch:]]

    # A fresh plan started mid-epoch (a resumed run) and one started in the second epoch read the same.
    for start in (5, per_epoch + 2):
        again = plan_of(folder)
        assert all(same(again.micro_batch(i), batches[i]) for i in range(start, plan.total_micro))
    # The same seed gives the same batches in another process's plan; another seed another order.
    assert [window_ids(plan_of(folder, seed=4).micro_batch(i)) for i in range(4)] != [window_ids(b) for b in batches[:4]]
    # Targets are each window's own fused target, whichever way it was read.
    direct = AlignedStore(folder)
    b0 = batches[0]
    first_window = window_ids(b0)[0]
    row, at = [(r, int(np.flatnonzero(b0.input_ids[r] == 1000 + first_window)[0])) for r in range(len(b0.input_ids))
               if (b0.input_ids[r] == 1000 + first_window).any()][0]
    ex = window_example(direct[first_window], "min_ce", "window", True)
    n = len(ex.input_ids)
    np.testing.assert_array_equal(b0.labels[row, at : at + n], ex.labels)
    np.testing.assert_array_equal(b0.target_probs[row, at : at + n, : ex.target_probs.shape[1]], ex.target_probs)


def test_worker_processes_give_the_batches_of_the_reading_thread(store):
    folder, _ = store
    inline = plan_of(folder, epochs=1)
    with plan_of(folder, epochs=1, workers=2) as pooled:
        assert all(same(pooled.micro_batch(i), inline.micro_batch(i)) for i in range(inline.total_micro))
        assert pooled.groups_read == inline.groups_read == len(inline.source.groups()) - 1


def test_ddp_ranks_read_disjoint_windows_that_cover_each_epoch(store):
    folder, windows = store
    plan = plan_of(folder, world_size=2, grad_accum=2, epochs=1)
    by_rank = {0: [], 1: []}
    for step in range(plan.total_steps):
        for rank in (0, 1):
            for i in plan.micro_indices(step, rank):
                if i is not None:
                    by_rank[rank] += window_ids(plan.micro_batch(i))
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == list(range(len(windows)))
    # Each rank decodes a row group at most once (and only the windows it trains on are fused).
    groups = len(plan.source.groups()) - 1
    assert all(plan._streams[r].feed.jobs_done <= groups for r in (0, 1))


def test_token_counts_exclude_padding():
    w = marked_windows(3)
    rows = [[(window_example(w[0], "min_ce", "window", True), 0, len(w[0].input_ids))],
            [(window_example(w[1], "min_ce", "window", True), 0, 3)]]
    packed = collate(rows, with_target=True)
    assert packed.input_ids.size == 2 * len(w[0].input_ids) and packed.tokens == len(w[0].input_ids) + 3
    unpacked = collate(rows, with_target=True, packed=False)
    assert unpacked.attention_mask.tolist() == [[1] * len(w[0].input_ids), [1] * 3 + [0] * (len(w[0].input_ids) - 3)]
    assert unpacked.tokens == packed.tokens


def test_a_shard_edited_after_verification_is_refused_by_name(tmp_path, monkeypatch):
    folder = write_windows(tmp_path / "a", marked_windows(20), [3, 3, 3], num_shards=2, settings={"row_group_rows": GROUP})
    hashed = []
    real_sha = aligned_store.sha256_file
    monkeypatch.setattr(aligned_store, "sha256_file", lambda path: hashed.append(path.name) or real_sha(path))
    assert len(AlignedStore(folder)) == 20 and hashed == []  # verified when written: no hashing at start-up

    shard = folder / "part-00001-of-00002.parquet"
    later = shard.stat().st_mtime_ns + 2_000_000_000
    data = shard.read_bytes()
    shard.write_bytes(data)  # the same bytes, rewritten (a copy): hashed once, found intact, stamped
    os.utime(shard, ns=(later, later))
    AlignedStore(folder)
    AlignedStore(folder)
    assert hashed == [shard.name]

    edited = bytearray(data)
    edited[len(edited) // 2] ^= 0xFF
    shard.write_bytes(bytes(edited))
    os.utime(shard, ns=(later + 10**9, later + 10**9))
    with pytest.raises(StoreError, match=f"{shard.name}: sha256 mismatch"):
        AlignedStore(folder)


def test_inspect_verifies_and_stamps_a_copied_store(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fusekit.cli import app

    folder = write_windows(tmp_path / "a", marked_windows(12), [3, 3, 3], num_shards=2)
    for shard in folder.glob("part-*.parquet"):  # as `cp` without -p leaves it: every shard newer than its sidecar
        later = shard.stat().st_mtime_ns + 5_000_000_000
        os.utime(shard, ns=(later, later))
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    hashed = []
    monkeypatch.setattr(aligned_store, "sha256_file", lambda path: hashed.append(path) or "")
    AlignedStore(folder)
    assert hashed == []


def opt_model(tmp_path):
    """A tiny OPT: learned absolute positions read from the attention mask, so packed windows attend to
    each other — it fails `packing_supported`."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                       layerdrop=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    net = OPTForCausalLM(config)
    net.save_pretrained(tmp_path / "opt")
    return tmp_path / "opt", net.eval()


def test_training_falls_back_to_padded_rows_on_a_model_that_cannot_pack(tmp_path):
    import fusekit
    from fusekit.models.packing import packing_supported
    from fusekit.train.engine import read_metrics
    from fusekit.train.loss import fused_loss

    path, net = opt_model(tmp_path)
    assert not packing_supported(net, 64)
    windows = marked_windows(4)
    for w in windows:
        w.input_ids = w.input_ids % 64
    lam = 0.7
    with pytest.warns(UserWarning, match="does not keep attention inside packed windows"):
        out = fusekit.run_train(path, windows, tmp_path / "t", lam=lam, max_length=32, batch_size=4, shuffle=False,
                            fused_head="off", max_steps=1, lr=1e-3, progress=False).out
    first = read_metrics(out)[0]
    # The expected loss: each window through the model alone, the fusion loss summed, over label tokens.
    total = labels = 0.0
    with torch.no_grad():
        for w in windows:
            ex = window_example(w, "min_ce", "window", True)
            logits = net(input_ids=torch.as_tensor(ex.input_ids)[None]).logits
            sums = fused_loss(logits, torch.as_tensor(ex.labels)[None], torch.as_tensor(ex.target_ids)[None],
                              torch.as_tensor(ex.target_probs)[None], lam)
            total += float(sums.total)
            labels += int((ex.labels != IGNORE).sum())
    assert first["loss"] == pytest.approx(total / labels, rel=1e-5)
    assert first["tokens"] == sum(len(w.input_ids) for w in windows)  # padding not counted
