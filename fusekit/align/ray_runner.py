"""`fusekit align --ray ADDRESS|auto`: the shards as Ray tasks on an existing cluster (`fusekit[ray]`).

Each task aligns one shard and returns its Parquet bytes and sidecar; the driver publishes them with
the same atomic writes as a serial run, so the files are identical and the output folder need not be
shared with the workers. The workers do need to read the extraction stores at the same paths (a shared
filesystem), which are sent as absolute paths.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

from fusekit._ray import connect, get
from fusekit.align.shard import ShardJob, ShardResult, align_shard
from fusekit.progress import task_progress


def _remote_align(job: ShardJob, index: int) -> ShardResult:
    return align_shard(job, index)


def run_on_ray(address: str, job: ShardJob, shards: Sequence[int], progress: bool = True) -> Iterator[ShardResult]:
    """Run `shards` as Ray tasks (one CPU each, or `job.workers`); yield results as they finish."""
    if not shards:
        return
    ray = connect(address)

    if job.workers is None:  # one CPU reserved per task: its DTW runs on one thread, not on every core
        job = replace(job, workers=1)
    task = ray.remote(num_cpus=job.workers, max_retries=2)(_remote_align)
    job_ref = ray.put(job)
    pending = {task.remote(job_ref, i): i for i in shards}
    with task_progress(progress) as bar:
        bar_task = bar.add_task(f"align {len(shards)} shard(s) on Ray", total=len(shards))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                result = get(ray, ref)
                bar.advance(bar_task)
                yield result
