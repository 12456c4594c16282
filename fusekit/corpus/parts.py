"""Where in a corpus a record comes from: the reading unit (part) a reader can start at without reading what
comes before.

A part is a Parquet row group, an Arrow record batch, a run of FILES_PER_PART text files, or a stretch of
a line file that starts at the first line at or after a multiple of PART_BYTES. Part boundaries depend
only on the files, never on where reading started, so a scan and a later read from any part agree.
"""

from __future__ import annotations

from typing import NamedTuple

PART_BYTES = 16 * 2**20  # a line file's part: ~16 MiB, so a shard job reads at most that much before its texts
FILES_PER_PART = 256


class Part(NamedTuple):
    """file: index in Source.files; pos: byte offset (line files), row group (Parquet), record batch
    (Arrow), unused for text files; line: the 1-based number of the part's first line (line files)."""

    file: int
    pos: int = 0
    line: int = 1


START = Part(0, 0, 1)
