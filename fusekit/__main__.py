"""`python -m fusekit` — the same as the `fusekit` console script."""

from fusekit.cli import main

main()
