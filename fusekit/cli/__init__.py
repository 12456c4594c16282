"""`fusekit` console script. Command modules register themselves on `app` when imported, in the order
`fusekit --help` lists them: the whole job first, then each stage in pipeline order."""

from fusekit.cli.app import app
from fusekit.cli import run  # noqa: F401  (run, plan, demo, fusechat)
from fusekit.cli import prepare  # noqa: F401
from fusekit.cli import extract  # noqa: F401
from fusekit.cli import inspect  # noqa: F401, A004  (the `fusekit inspect` command)
from fusekit.cli import align  # noqa: F401
from fusekit.cli import train  # noqa: F401
from fusekit.cli import distill  # noqa: F401
from fusekit.cli import eval  # noqa: F401, A004  (the `fusekit eval` command)
from fusekit.cli import merge  # noqa: F401
from fusekit.cli import align_text  # noqa: F401
from fusekit.cli import implicit  # noqa: F401  (FuseChat-3.0 implicit fusion)


PIPED_COLUMNS = 200


def _warning_line(message, category, filename, lineno, file=None, line=None) -> str:  # noqa: ARG001
    # On the command line a warning is one line for the user, not a source location and a code line.
    return f"warning: {message}\n"


def main() -> None:
    import os
    import sys
    import warnings

    warnings.formatwarning = _warning_line
    if "COLUMNS" not in os.environ and not sys.stdout.isatty() and not sys.stderr.isatty():
        # A batch job's log (a farm job, CI): tables at their own width, not cut at rich's 80 columns.
        # Only when neither stream is a terminal: rich takes COLUMNS over a terminal's own width.
        os.environ["COLUMNS"] = str(PIPED_COLUMNS)
    app()


__all__ = ["app", "main"]
