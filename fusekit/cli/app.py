"""The Typer application object; each command lives in its own module under fusekit/cli/."""

import shutil

import typer

# Rich help panels cut long option names and paths with "…" in terminals narrower than ~100 columns;
# there the plain help (which wraps instead) is used.
_NARROW = shutil.get_terminal_size((120, 40)).columns < 100

app = typer.Typer(
    name="fusekit",
    help="Knowledge fusion of LLMs: extract source distributions, align them onto the target's tokens, "
    "fuse and train the target, merge fused chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None if _NARROW else "rich",
)
