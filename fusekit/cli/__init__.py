"""`fusekit` console script. Command modules register themselves on `app` when imported."""

from fusekit.cli.app import app
from fusekit.cli import align_text  # noqa: F401  (registers commands)


def main() -> None:
    app()


__all__ = ["app", "main"]
