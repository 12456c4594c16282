"""Streaming: merge and write the output one tensor at a time, so memory holds one tensor per model.

Each tensor is read from the base and every model (safetensors, lazily), cast to the working dtype
(float32, or float64 for float64 inputs) on the merge device, handed to the method with its resolved
options (TensorJob.inputs), cast to the planned output dtype and appended to the current shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from fusekit.merge.io import CODE_TO_DTYPE, ModelFolder, OutTensor, ShardedWriter, TensorInfo
from fusekit.merge.options import TensorJob
from fusekit.merge.report import VarmReport


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]merge"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensor]}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


def stream_merge(
    job: TensorJob,
    plan: list[OutTensor],
    base_folder: ModelFolder,
    folders: list[ModelFolder],
    out: Path,
    max_bytes: int,
    device: torch.device,
    report: VarmReport | None,
    progress: bool,
) -> tuple[list[Path], int]:
    """Merge and write the planned tensors one by one into `out`; returns the shard paths and the bytes read.

    `plan` lists the output tensors in the base's order with their output dtypes; shards close at
    `max_bytes`. A method's per-tensor facts (VaRM's weights) go to `report`. On any error the
    partly written shards are removed.
    """
    writer = ShardedWriter(out, plan, max_bytes)
    sizes = {o.name: base_folder.tensors[o.name].nbytes + sum(f.tensors[o.name].nbytes for f in folders) for o in plan}
    try:
        with _progress(progress) as bar:
            task = bar.add_task("merge", total=sum(sizes.values()), tensor="")
            for target in plan:
                bar.update(task, tensor=target.name)
                merged, info_row = _merge_one(job, base_folder.tensors[target.name], base_folder, folders, device)
                writer.write(target.name, merged.to(CODE_TO_DTYPE[target.dtype]))
                del merged
                if report is not None and info_row is not None:
                    report.add(target.name, info_row)
                bar.advance(task, sizes[target.name])
        return writer.finish(), sum(sizes.values())
    except BaseException:
        writer.abort()
        raise


def _merge_one(
    job: TensorJob, info: TensorInfo, base_folder: ModelFolder, folders: list[ModelFolder], device: torch.device
) -> tuple[torch.Tensor, dict | None]:
    # The models' tensors are ours to overwrite (owned=True): `.to` copies them, or, where it does not,
    # safe_open returns a private copy-on-write mapping (writes never reach the file).
    base_t = base_folder.read(info.name)
    if not info.is_float:
        # Integer/bool buffers (position ids, masks) are not parameters: they are the base's.
        return base_t, None
    work = torch.float64 if info.dtype == "F64" else torch.float32
    inputs = job.inputs(
        info.name,
        base_t.to(device=device, dtype=work),
        [f.read(info.name).to(device=device, dtype=work) for f in folders],
    )
    result = job.spec.fn(inputs)
    return result.tensor, result.info
