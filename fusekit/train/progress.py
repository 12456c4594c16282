"""The training progress bar: step, loss, tokens/s and learning rate (rich; silent when disabled)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="–", tps="–", lr="–")

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        tps = metrics.get("tokens_per_s")
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{metrics['loss']:.4f}",
            tps=f"{tps:,.0f}" if tps else "–",
            lr=f"{metrics['lr']:.2e}",
        )
