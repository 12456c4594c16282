"""`fusekit extract --ray auto|ADDRESS|local`: the shards as Ray tasks, one model per worker.

Each worker (a Ray actor) loads the model and tokenizer once and computes whole shards with
`compute_shard`, the serial run's own function; it returns the shard's Parquet bytes and sidecar
entries, which the driver publishes with the same atomic writes as a serial run. So the files are
byte-identical to a serial run's, and only the driver writes to OUT; the workers need the model and
nothing else (the driver sends each shard's texts). A worker takes one GPU when the cluster has GPUs
(Ray sets CUDA_VISIBLE_DEVICES), else one CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from fusekit._ray import connect, get
from fusekit.extract.errors import ExtractError
from fusekit.extract.shard import ShardOutput, compute_shard
from fusekit.extract.shard_log import token_bar


@dataclass(frozen=True)
class ExtractJob:
    """What every worker needs to compute any shard of one run."""

    model: str
    dtype: str
    device: str | None
    trust_remote_code: bool
    settings: dict
    digest: str
    num_shards: int
    n_texts: int
    batch_size: int
    pack: bool


class _Worker:
    def __init__(self, job: ExtractJob, threads: int):
        import torch

        from fusekit.models.device import load_net, resolve_device
        from fusekit.models.load import load_tokenizer, require_fast_tokenizer

        torch.set_num_threads(threads)
        self.job = job
        self.tokenizer = require_fast_tokenizer(load_tokenizer(job.model, trust_remote_code=job.trust_remote_code), job.model)
        self.net = load_net(job.model, job.dtype, resolve_device(job.device), job.trust_remote_code)

    def shard(self, index: int, records: list) -> ShardOutput:
        j = self.job
        return compute_shard(
            self.net, self.tokenizer, records, index, j.num_shards, j.n_texts, j.settings, j.digest, j.batch_size, token_bar(False), j.pack
        )


def run_on_ray(address: str, job: ExtractJob, shards: Iterable[tuple[int, list]], workers: int | None = None) -> Iterator[ShardOutput]:
    """Compute `shards` ((index, records) pairs, read lazily) on `workers` Ray actors; yield each shard as
    it finishes. At most two shards per worker are in flight, so the corpus is not read ahead of them."""
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and (job.device is None or job.device.startswith("cuda"))
    if workers is None:
        workers = gpus if use_gpu else max(1, int(resources.get("CPU", 1)))
    if workers < 1:
        raise ExtractError(f"--ray-workers must be at least 1, got {workers}")
    options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    device = job.device if not use_gpu or job.device else "cuda"
    actor = ray.remote(**options)(_Worker)
    job_ref = ray.put(_with_device(job, device))
    pool = [actor.remote(job_ref, 1) for _ in range(workers)]
    idle = list(pool)
    pending: dict = {}
    source = iter(shards)
    exhausted = False
    try:
        while True:
            while not exhausted and idle and len(pending) < 2 * workers:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                w = idle.pop(0)
                pending[w.shard.remote(nxt[0], nxt[1])] = w
                idle.append(w)  # an actor queues its calls; two in flight each keeps it busy
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                yield get(ray, ref)
    finally:
        for ref in pending:
            ray.cancel(ref, force=False)
        for w in pool:
            ray.kill(w)


def _with_device(job: ExtractJob, device: str | None) -> ExtractJob:
    from dataclasses import replace

    return replace(job, device=device)
