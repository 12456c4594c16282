"""Stage 2 over stores: every source's top-k onto the target's tokens, written as an aligned store.

`align_store(target, sources, out)` reads extraction stores of one corpus (FUSION-METHOD.md §2–3), checks
them (`inputs.py`), resolves each source's method and vocabulary map, and aligns the corpus shard by
shard (`shard.py`, serially or as Ray tasks, `ray_runner.py`) before writing report.json (`report.py`).

* **Vocabulary map** source → target, built once per tokenizer pair and cached on disk
  (`vocab_cache.py`); for the `fusechat` method, FuseChat's statistical map counted over this corpus
  (`statmap.py`, cached per tokenizer pair and corpus); for `bytespan`, exact matches only (its counts
  go to the report, the transfer itself needs no map).
* **Candidates**, per target window: [0] the target's own (`candidates.py`), then each source in order,
  by its method: the 1:1 carry of `fusellm` and `fusechat` (`carry.py`) or the byte-span transfer of
  whole texts (`bytespan.py`).

Shards split the corpus by text id, like extraction; each shard's result is a pure function of the
inputs, so a resumed, a sharded (`--shard I/N`) or a Ray run writes byte-identical files.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from fusekit._parallel import in_parallel
from fusekit.align.inputs import StoreRef, check_stores, describe, info_of, open_extract
from fusekit.align.ray_runner import run_on_ray
from fusekit.align.report import TIMINGS, build_report, print_report, split_timings
from fusekit.align.shard import ShardContext, ShardJob, ShardResult, align_and_write_shard, write_shard
from fusekit.align.corpus_statmap import statistical_map
from fusekit.align.transfer import DEFAULT_METHOD, Method
from fusekit.align.vocab_cache import VocabMap, default_cache_dir, exact_map, vocab_map
from fusekit.progress import task_progress
from fusekit.store.aligned_format import COUNTS_DIR, FORMAT, FORMAT_VERSION, REPORT, row_group_rows
from fusekit.store.atomic import clean_temporaries, write_json_atomic
from fusekit.store.errors import StoreError
from fusekit.store.shards import (
    complete_shards,
    open_store,
    parse_shard,
    read_manifest,
    settings_digest,
    shard_filename,
    shard_is_complete,
    shard_slice,
    update_manifest,
)


class _Stopped(Exception):
    """A shard ended early because another failed (that one's exception is raised)."""


def _identity(store) -> dict:
    """What the aligned store depends on from one extraction store (paths excluded: stores may move)."""
    s = store.settings
    return {
        "model": s.get("model"),
        "tokenizer_fingerprint": store.tokenizer_fingerprint,
        "scheme": str(getattr(store.scheme, "value", store.scheme)),
        "vocab_size": len(store.vocab),
        "k": int(store.k),
        "max_length": s.get("max_length"),
        "extract_settings_sha256": settings_digest(s),
    }


def _methods(method: str | Sequence[str] | None, n: int) -> list[Method]:
    """One method per source from `align_store(method=…)`: None (the default), one name for all, or a list."""
    names = [method] * n if method is None or isinstance(method, (str, Method)) else list(method)
    if len(names) != n:
        raise StoreError(f"{len(names)} alignment methods for {n} sources: give one, or one per source")
    known = {m.value for m in Method}
    unknown = sorted({str(m) for m in names if m is not None and str(getattr(m, "value", m)) not in known})
    if unknown:
        raise StoreError(f"unknown alignment method {', '.join(map(repr, unknown))}: choose from {', '.join(m.value for m in Method)}")
    return [Method(m) if m is not None else DEFAULT_METHOD for m in names]


def _source_map(
    target, source, method: Method, cache_dir: str | Path | None, workers: int | None, shared: Path | None = None, start: float = 0.0
) -> VocabMap:
    """The vocabulary map a source's method carries through: FuseLLM's (cached per tokenizer pair), the
    statistical one built on it (`fusechat`: counts per pair and corpus, shared by every job of the store
    through the folder `shared` and cached beside the vocabulary maps; `start`: where this job begins among
    the count parts, as a share of them), or exact matches only (`bytespan`, for the report's counts)."""
    if method is Method.BYTESPAN:
        return exact_map(info_of(source), info_of(target))
    fixed = vocab_map(
        list(source.vocab), list(target.vocab), source.tokenizer_fingerprint, target.tokenizer_fingerprint, cache_dir, workers, info_of(source), info_of(target)
    )
    if method is Method.FUSELLM:
        return fixed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return statistical_map(target, source, fixed, cache, workers, shared, start)


def _num_shards(shard: str | None, num_shards: int | None, out: Path, target) -> tuple[int, list[int]]:
    """(N, the shards this run does): --shard I/N, else --shards, else the existing store's, else the target's."""
    if shard is not None:
        index, count = parse_shard(shard)
        if num_shards is not None and num_shards != count:
            raise StoreError(f"--shard {shard} names {count} shards but --shards says {num_shards}; give one of them")
        return count, [index]
    if num_shards is None:
        try:
            manifest = read_manifest(out)
            if manifest.get("format") == FORMAT:
                num_shards = int(manifest["settings"]["num_shards"])
        except (StoreError, KeyError, TypeError, ValueError):
            pass
    if num_shards is None:
        num_shards = int(target.settings.get("num_shards") or 1)
    if num_shards < 1:
        raise StoreError(f"the number of shards must be at least 1, got {num_shards}")
    return num_shards, list(range(num_shards))


def align_store(
    target: StoreRef,
    sources: Sequence[StoreRef] | StoreRef,
    out: str | Path,
    *,
    shard: str | None = None,
    num_shards: int | None = None,
    workers: int | None = None,
    vocab_map_cache: str | Path | None = None,
    ray: str | None = None,
    method: str | Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Align every source's top-k onto the target's tokens and write the aligned store OUT; returns the report.

    `target` and `sources` are extraction stores (folders, or objects with the ExtractStore interface) of
    the same corpus. `shard="I/N"` does only shard I of N (independent jobs fill one store with no
    coordinator); `num_shards` sets N for a whole run (default: the existing store's, else the target
    store's). `workers`: threads (default: all cores), up to that many shards
    aligned at once, their Rust kernels sharing a pool of that many threads. `vocab_map_cache` is the
    folder of cached vocabulary maps (default `~/.cache/fusekit/vocab-maps`). `ray` ("auto" or an
    address) runs the shards as Ray tasks; the files are the same. Shards already complete are kept.
    `method`: how each source reaches the target's tokens — "bytespan" (default: the chain-rule transfer
    on byte spans, every position), "fusellm" (the paper's 1:1 carry) or "fusechat" (the 1:1 carry through
    FuseChat's statistical vocabulary map, counted over this corpus first and cached beside the vocabulary
    maps); one name for all sources or a list, one per source (`fusekit.align.transfer`, docs/ALIGN.md).
    """
    if isinstance(sources, (str, Path)) or not isinstance(sources, Iterable):
        sources = [sources]
    source_refs = list(sources)
    out = Path(out)
    if workers is not None and workers < 1:
        raise StoreError(f"--workers must be at least 1, got {workers}")
    tgt = open_extract(target, "target", workers)
    srcs = [open_extract(ref, f"source {i + 1}", workers) for i, ref in enumerate(source_refs)]
    check_stores(tgt, srcs, [target, *source_refs])
    count, todo = _num_shards(shard, num_shards, out, tgt)

    methods = _methods(method, len(srcs))
    max_length = int(tgt.settings.get("max_length") or max((len(w.input_ids) for w in tgt.iter_windows()), default=1))
    settings = {
        "format_version": FORMAT_VERSION,
        "corpus_fingerprint": tgt.corpus_fingerprint,
        "n_texts": int(tgt.n_texts),
        "num_shards": count,
        "row_group_rows": row_group_rows(max_length),
        "ks": [int(tgt.k), *[int(s.k) for s in srcs]],
        "target": _identity(tgt),
        "sources": [_identity(s) for s in srcs],
        "methods": [m.value for m in methods],
    }
    extra_files = [REPORT, TIMINGS, *([COUNTS_DIR] if Method.FUSECHAT in methods else [])]
    manifest = open_store(out, FORMAT, settings, extra={"extra_files": extra_files})
    missing = [f for f in extra_files if f not in manifest.get("extra_files", [])]
    if missing:  # a store begun before its jobs shared the fusechat counts through it
        update_manifest(out, {"extra_files": [*manifest.get("extra_files", []), *missing]})
    clean_temporaries(out)
    # The fusechat counts: one pass per (pair, corpus) for all jobs of this store, through its folder.
    start = todo[0] / count if todo else 0.0
    vmaps = [_source_map(tgt, s, m, vocab_map_cache, workers, out / COUNTS_DIR, start) for s, m in zip(srcs, methods)]
    settings = read_manifest(out)["settings"]  # exactly what a reader sees
    # Ray tasks reopen the stores by (absolute) path; objects travel as they are.
    absolute = lambda ref: str(Path(ref).resolve()) if isinstance(ref, (str, Path)) else ref  # noqa: E731
    job = ShardJob(target=absolute(target), sources=[absolute(r) for r in source_refs], vmaps=vmaps, settings=settings, workers=workers)
    todo = [i for i in todo if not shard_is_complete(out, shard_filename(i, count))]

    t0 = time.perf_counter()
    results: list[ShardResult] = []
    if ray is not None:
        for result in run_on_ray(ray, job, todo, progress=progress):
            write_shard(out, count, result)
            result.data = None  # published: the report needs only its counts
            results.append(result)
    else:
        # A shard per worker thread, their Rust kernels on one pool of `workers` threads: one shard's
        # reading, Python steps and encoding run while another's kernels do, and the pool balances shards
        # of unequal sizes (benchmarks/bench_align_store.py: 2 workers 1.5x -> 1.8x one worker). Memory:
        # a batch of texts and a row group per shard at work.
        at_once = min(len(todo), workers or os.cpu_count() or 1)
        stop = threading.Event()
        context = ShardContext(job) if todo else None  # stores and vocabulary pairs prepared once for all shards
        with task_progress(progress) as bar:

            def one(i: int) -> ShardResult:
                texts = shard_slice(int(settings["n_texts"]), i, count)
                task = bar.add_task(f"align shard {i}/{count} ({len(texts)} texts)", total=None)

                def tick(done: int, total: int, task=task) -> None:
                    if stop.is_set():  # another shard failed or the run was interrupted: end at this batch
                        raise _Stopped()
                    bar.update(task, completed=done, total=total)

                # Shards at work side by side already overlap their reading, kernels and encoding.
                return align_and_write_shard(job, i, out, tick, context, prefetch=None if at_once == 1 else False)

            results = in_parallel(one, todo, at_once, stop)
    wall = time.perf_counter() - t0

    report = build_report(
        settings,
        complete_shards(out),
        vmaps,
        results,
        wall=wall,
        workers=workers or os.cpu_count() or 1,
        ray=ray,
        target_ref=describe(target),
        source_refs=[describe(r) for r in source_refs],
    )
    stable, timings = split_timings(report)
    write_json_atomic(stable, out / REPORT)
    if results or not (out / TIMINGS).exists():  # a re-run with nothing left to do keeps the last run's
        write_json_atomic(timings, out / TIMINGS)
    if progress:
        print_report(report)
    return report
