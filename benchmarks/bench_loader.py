"""The training data loader alone: target tokens/s and start-up time, against plain Polars reads.

    python benchmarks/bench_loader.py [--quick] [--workers N] [--tokens 2200000]

A synthetic aligned store — windows of 2,048 target tokens, the target and 3 sources with top-10 each,
ids over a 32k vocabulary, float16 probabilities, per-position CE with fallbacks — is written with the
store's own writer (`aligned_format.write_windows`: `windows_frame` → `encode_shard` → atomic shard →
sidecar), once at ≥ 2M target tokens and once 20× smaller.

* Throughput: one epoch of the trainer's loader (`DataPlan.micro_batch` for every micro-batch of one
  rank: row-group shuffle, decoding, MinCE window fusion, collation into 8 × 2,048 rows) in target
  tokens per second (padding not counted), from the plan's creation to the last batch. Baseline: a
  plain sequential `pl.read_parquet` of the same columns, every shard in order, each column flattened
  to numpy (Polars on all its threads). Goal: ≥ 0.5 ×.
* For the record, the loader before this change (a permutation of windows, `store[i]` decoding a row
  group per window, fusion in the reading thread) on the first 64 windows of its order.
* Start-up: opening the store and planning the run until the first micro-batch is in hand, on the big
  store vs the 20× smaller one. Goal: big ≤ 1.5 × small + 5 s. For the record, the start-up before
  (every shard's sha256 in every rank at every start).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

from fusekit.store.aligned_format import WINDOW_COLUMNS, candidate_columns, write_windows  # noqa: E402
from fusekit.store.aligned_store import AlignedStore  # noqa: E402
from fusekit.store.types import AlignedWindow, Candidate  # noqa: E402
from fusekit.train.data import DataPlan  # noqa: E402
from fusekit.train.examples import window_example  # noqa: E402
from fusekit.train.rows import collate  # noqa: E402
from fusekit.train.source import open_source  # noqa: E402

WINDOW, K, SOURCES, VOCAB = 2048, 10, 3, 32_000
GOALS = {"throughput": 0.5, "startup_ratio": 1.5, "startup_slack_s": 5.0}


def synthetic_windows(n_windows: int, seed: int) -> list[AlignedWindow]:
    """Windows of 2,048 tokens (one in ten shorter: a text's last window), K+1 candidates of top-10 each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_windows):
        n = WINDOW if rng.random() > 0.1 else int(rng.integers(256, WINDOW))
        cands = []
        for c in range(SOURCES + 1):
            # K distinct ids per position (colliding ids are summed by alignment), in random order
            ids = np.sort(rng.integers(0, VOCAB - K, size=(n, K)), axis=1) + np.arange(K)
            ids = rng.permuted(ids, axis=1).astype(np.int32)
            logits = np.sort(rng.gumbel(size=(n, K)).astype(np.float32), axis=1)[:, ::-1] * 2
            probs = np.exp(logits - logits[:, :1])
            probs /= probs.sum(1, keepdims=True)
            ce = rng.exponential(1.5, size=n).astype(np.float32)
            if c:
                ce[rng.random(n) < 0.05] = np.nan  # positions where a source fell back
            ce[-1] = np.nan
            cands.append(Candidate(ids, probs, ce, float(np.nanmean(ce))))
        out.append(AlignedWindow(i // 4, i % 4, rng.integers(0, VOCAB, size=n).astype(np.int64), cands))
    return out


def build(folder: Path, n_windows: int, shards: int, seed: int) -> int:
    windows = synthetic_windows(n_windows, seed)
    write_windows(folder, windows, [K] * (SOURCES + 1), num_shards=shards)
    return sum(len(w.input_ids) for w in windows)


def plain_read(folder: Path) -> tuple[int, float]:
    """(target tokens, seconds): every shard read in order, every column the loader reads, to numpy."""
    columns = WINDOW_COLUMNS + candidate_columns([K] * (SOURCES + 1)) + ["n"]
    t0 = time.perf_counter()
    tokens = 0
    for path in sorted(folder.glob("part-*.parquet")):
        df = pl.read_parquet(path, columns=columns)
        for name in columns:
            col = df[name]
            _ = col.explode().to_numpy() if col.dtype == pl.List else col.to_numpy()
        tokens += int(df["n"].sum())
    return tokens, time.perf_counter() - t0


def make_plan(folder: Path, workers: int) -> DataPlan:
    return DataPlan(open_source(folder), max_length=WINDOW, batch_size=8, grad_accum=1, epochs=1, seed=0, workers=workers)


def loader_epoch(folder: Path, workers: int) -> tuple[int, float, int, int]:
    """(real tokens, seconds, row groups decoded, row groups in the store) for one epoch of one rank."""
    t0 = time.perf_counter()
    plan = make_plan(folder, workers)
    tokens = 0
    try:
        for i in range(plan.total_micro):
            tokens += plan.micro_batch(i).tokens
        seconds = time.perf_counter() - t0
        return tokens, seconds, plan.groups_read, len(plan.source.groups()) - 1
    finally:
        plan.close()


def loader_before(folder: Path, windows: int = 64) -> tuple[int, float]:
    """The loader before: a permutation of all windows, `store[i]` per window, fused where read."""
    store = AlignedStore(folder)
    order = np.random.default_rng([0, 0]).permutation(len(store))[:windows]
    t0 = time.perf_counter()
    tokens = 0
    for lo in range(0, windows, 8):
        examples = [window_example(store[int(i)], "min_ce", "window", True) for i in order[lo : lo + 8]]
        tokens += collate([[(ex, 0, len(ex.input_ids))] for ex in examples], True).tokens
    return tokens, time.perf_counter() - t0


def startup(folder: Path, workers: int) -> float:
    t0 = time.perf_counter()
    plan = make_plan(folder, workers)
    try:
        plan.micro_batch(0)
        return time.perf_counter() - t0
    finally:
        plan.close()


def startup_before(folder: Path) -> float:
    """What every rank paid at every start before: the sha256 of every shard (plus the same planning)."""
    t0 = time.perf_counter()
    for path in sorted(folder.glob("part-*.parquet")):
        hashlib.sha256(path.read_bytes()).hexdigest()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2_200_000, help="target tokens of the big store (≥ 2M for the goal)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="loader worker processes (default: the trainer's default for the big store)")
    ap.add_argument("--repeat", type=int, default=3, help="alternated runs of the baseline and the loader (best of each)")
    ap.add_argument("--quick", action="store_true", help="a 10× smaller big store (not the goal's size)")
    ap.add_argument("--keep", type=Path, default=None, help="build the stores here and keep them (reused when present)")
    args = ap.parse_args()
    tokens = args.tokens // (10 if args.quick else 1)
    big_windows = max(40, round(tokens / (WINDOW * 0.95)))
    small_windows = max(2, big_windows // 20)

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        big, small = root / "big", root / "small"
        for folder, n, shards, seed in ((big, big_windows, args.shards, 0), (small, small_windows, max(1, args.shards // 4), 1)):
            if not (folder / "manifest.json").is_file():
                t0 = time.perf_counter()
                built = build(folder, n, shards, seed)
                print(f"wrote {folder.name}: {n:,} windows, {built:,} target tokens, {shards} shards in {time.perf_counter() - t0:.1f} s")
        from fusekit.train.source import default_workers

        workers = args.workers if args.workers is not None else default_workers(open_source(big))
        size = sum(p.stat().st_size for p in big.glob("part-*.parquet"))
        print(f"big store: {size / 2**20:.0f} MiB on disk; loader workers: {workers}")

        plain_read(big)  # warm the page cache for both readers
        # Alternated, best of each: the machine's other load weighs on both alike.
        bases, runs = [], []
        for _ in range(args.repeat):
            bases.append(plain_read(big))
            runs.append(loader_epoch(big, workers))
        base_tokens, base_s = min(bases, key=lambda r: r[1])
        ld_tokens, ld_s, groups_read, groups = min(runs, key=lambda r: r[1])
        before_tokens, before_s = loader_before(big)
        base_rate, ld_rate, before_rate = base_tokens / base_s, ld_tokens / ld_s, before_tokens / before_s

        small_start = min(startup(small, workers) for _ in range(3))
        big_start = min(startup(big, workers) for _ in range(3))
        hash_big, hash_small = startup_before(big), startup_before(small)

        rows = [
            ["plain polars read → numpy (baseline)", f"{base_rate / 1e6:.3f} M", 1.0, ""],
            [f"loader, 1 epoch ({workers} workers; {groups_read}/{groups} row groups decoded)", f"{ld_rate / 1e6:.3f} M",
             ld_rate / base_rate, "pass" if ld_rate / base_rate >= GOALS["throughput"] else "FAIL"],
            ["loader before (store[i] per window, 64 windows)", f"{before_rate / 1e6:.3f} M", before_rate / base_rate, ""],
        ]
        print_table(f"loader throughput, target tokens/s ({base_tokens:,} tokens; goal ≥ {GOALS['throughput']} × baseline)",
                    ["reader", "tokens/s", "× baseline", "goal"], rows)
        limit = GOALS["startup_ratio"] * small_start + GOALS["startup_slack_s"]
        print_table(
            f"start-up until the first micro-batch (goal: big ≤ {GOALS['startup_ratio']} × small + {GOALS['startup_slack_s']:.0f} s)",
            ["store", "start-up s", "× small", "sha256 of every shard s (before, per rank per start)"],
            [
                [f"small ({small_windows:,} windows)", small_start, 1.0, hash_small],
                [f"big ({big_windows:,} windows)", big_start, big_start / small_start, hash_big],
                ["goal", f"≤ {limit:.2f}", "pass" if big_start <= limit else "FAIL", ""],
            ],
        )
        print(f"ratios: throughput {ld_rate / base_rate:.2f} × plain read; start-up big/small {big_start / small_start:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
