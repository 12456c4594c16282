"""What an extraction run shows while it works: a token bar in a terminal, a line per shard in a log file."""

from __future__ import annotations

import sys
import time


def token_bar(progress: bool):
    """A rich bar per shard counting its tokens, with the rate in tokens/s (silent when `progress` is off)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} tok/s" if task.speed else "… tok/s", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), Rate(),
        TimeRemainingColumn(), disable=not progress,
    )


class ShardLog:
    """One line per finished shard on stderr (tokens/s, ETA) when the progress bar cannot show: outside a
    terminal (a batch job's log file). Quiet with progress off, and in a terminal the bar says it all."""

    def __init__(self, shards: int, enabled: bool = True):
        self.total, self.finished, self.tokens = shards, 0, 0
        self.start = time.perf_counter()
        self.enabled = enabled and not sys.stderr.isatty()

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def done(self, label: str, tokens: int) -> None:
        self.finished += 1
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = elapsed / self.finished * (self.total - self.finished)
        eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        self.say(f"{label}: {tokens:,} tokens, {rate:,.0f} tokens/s; {self.finished}/{self.total} of this run done, ETA {eta}")
