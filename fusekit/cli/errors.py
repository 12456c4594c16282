"""Errors for the CLI: a user mistake prints `error: …` (no traceback) and exits with 1.

fusekit's own exception types carry actionable messages; so does an OSError about a named file (a
read-only folder, a full disk, a missing file). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

F = TypeVar("F", bound=Callable)
_err = Console(stderr=True)
INTERRUPTED = (
    "interrupted; every file written so far is complete (fusekit writes through temporary names): "
    "run the same command again to resume (`fusekit train`/`distill`: add --resume)"
)


def is_user_error(exc: BaseException) -> bool:
    if type(exc).__module__.startswith("fusekit"):
        return True
    return isinstance(exc, OSError) and (isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.filename is not None)


def describe(exc: BaseException) -> str:
    """The message to show: an OSError about a file names the file, the problem and what to do."""
    if isinstance(exc, OSError) and exc.filename is not None and not type(exc).__module__.startswith("fusekit"):
        what = exc.strerror or type(exc).__name__
        hint = {
            PermissionError: "check the folder's permissions or choose another path",
            FileNotFoundError: "check the path",
            NotADirectoryError: "a part of the path is a file, not a folder",
            IsADirectoryError: "give a file, not a folder",
        }.get(type(exc), "check the path, its permissions and the free space")
        return f"{exc.filename}: {what} ({hint})"
    return str(exc)


def fail(message: str, code: int = 1) -> NoReturn:
    """`error: <first line>`; further lines (one problem each) follow, indented, so lists stay readable."""
    first, *rest = [line for line in message.strip().splitlines() if line.strip()] or [""]
    # Messages are plain text: `pip install 'fusekit[eval]'` must not be read as rich markup.
    _err.print(f"[bold red]error:[/] {escape(first)}", highlight=False, soft_wrap=True)
    for line in rest:
        _err.print(f"  {escape(line.strip())}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Decorate a Typer command so fusekit's exceptions end it with an `error:` line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            fail(INTERRUPTED, code=130)  # 128 + SIGINT, as the shell reports a process Ctrl-C ended
        except Exception as exc:
            if not is_user_error(exc):
                raise
            fail(describe(exc))

    return wrapper  # type: ignore[return-value]
