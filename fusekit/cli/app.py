"""The Typer application object; each command lives in its own module under fusekit/cli/."""

import typer

app = typer.Typer(
    name="fusekit",
    help="Knowledge fusion of LLMs: extract source distributions, align them onto the target's tokens, "
    "fuse and train the target, merge fused chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
