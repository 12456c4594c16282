"""One-line errors for the CLI: a user mistake prints `error: …` (no traceback) and exits with 1.

fusekit's own exception types carry actionable messages; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable)
_err = Console(stderr=True)


def is_user_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("fusekit") or isinstance(exc, (FileNotFoundError, NotADirectoryError))


def fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Decorate a Typer command so fusekit's exceptions end it with one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if not is_user_error(exc):
                raise
            fail(str(exc).replace("\n", " "))

    return wrapper  # type: ignore[return-value]
