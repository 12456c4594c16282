"""The Typer application object; each command lives in its own module under fusekit/cli/."""

import shutil
import sys

import typer

# Rich help panels cut long option names and paths with "…" in terminals narrower than ~100 columns, and
# keep the docstrings' line breaks when output goes to a pipe or a file (rendered at 80 columns, lines then
# break mid-sentence); there the plain help, which re-wraps paragraphs, is used.
_NARROW = shutil.get_terminal_size((120, 40)).columns < 100 or not sys.stdout.isatty()

app = typer.Typer(
    name="fusekit",
    help="Knowledge fusion of LLMs: extract source distributions, align them onto the target's tokens, "
    "fuse and train the target, merge fused chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None if _NARROW else "rich",
)


def _print_version(value: bool) -> None:
    if value:
        from fusekit._version import __version__

        typer.echo(f"fusekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print fusekit's version and exit.", is_eager=True, callback=_print_version),
) -> None:
    # Only the --version flag lives here; the application's help is `app`'s.
    del version
