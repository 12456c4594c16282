"""`fusekit align --ray ADDRESS|auto`: the shards as Ray tasks on an existing cluster (`fusekit[ray]`).

Each task aligns one shard and returns its Parquet bytes and sidecar; the driver publishes them with
the same atomic writes as a serial run, so the files are identical and the output folder need not be
shared with the workers. The workers do need to read the extraction stores at the same paths (a shared
filesystem), which are sent as absolute paths.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

from fusekit.align.store import ShardJob, ShardResult, align_shard


class RayError(Exception):
    """Ray is missing or the cluster cannot be reached."""


def _remote_align(job: ShardJob, index: int) -> ShardResult:
    return align_shard(job, index)


def _connect(address: str):
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs the `ray` package: pip install 'fusekit[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        try:
            # "local" starts a private cluster on this machine; anything else joins an existing one.
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayError(
                f"cannot connect to the Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                "or give its address (ray://host:10001 or host:6379), or use --ray local"
            ) from None
    return ray


def run_on_ray(address: str, job: ShardJob, shards: Sequence[int], progress: bool = True) -> Iterator[ShardResult]:
    """Run `shards` as Ray tasks (one CPU each, or `job.workers`); yield results as they finish."""
    if not shards:
        return
    ray = _connect(address)
    from ray.exceptions import RayTaskError

    if job.workers is None:  # one CPU reserved per task: its DTW runs on one thread, not on every core
        job = replace(job, workers=1)
    task = ray.remote(num_cpus=job.workers, max_retries=2)(_remote_align)
    job_ref = ray.put(job)
    pending = {task.remote(job_ref, i): i for i in shards}
    from fusekit.align.store import _progress

    with _progress(progress) as bar:
        bar_task = bar.add_task(f"align {len(shards)} shard(s) on Ray", total=len(shards))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
                    if cause is not None and type(cause).__module__.startswith("fusekit"):
                        raise cause from None
                    raise
                bar.advance(bar_task)
                yield result
