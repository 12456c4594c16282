"""Progress bars of the stages' long work (rich; silent when disabled or not wanted)."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def task_progress(enabled: bool) -> Progress:
    """A bar per task, described by the task's own text: share done, time spent, time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
