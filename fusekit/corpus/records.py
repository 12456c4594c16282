"""A corpus's records, what reading skipped, and the fingerprint that names a corpus as read.

A record is one text (or one chat conversation); its id is its position among the records kept, so
every reader (whole-file or streamed, all of it or one shard's part) must yield the same records in the
same order, and `corpus_fingerprint` over them must not change (stores written before carry it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Iterable


class CorpusError(ValueError):
    """Data that cannot be read as a corpus, with what is wrong and where."""


@dataclass
class Record:
    text: str | None = None
    messages: list[dict] | None = None
    eos: bool = True  # False: a piece of a longer document that `fusekit prepare` cut (no end of document)


@dataclass
class CorpusStats:
    """What reading skipped: texts that are empty (or whitespace only) and texts that are not UTF-8.

    Skipping (rather than failing) lets one bad line of a large scraped corpus not stop a run; the
    counts are reported so that nothing is dropped silently.
    """

    texts: int = 0
    empty: int = 0
    non_utf8: int = 0
    examples: list[str] = dc_field(default_factory=list)  # where the first few skipped texts were

    def skip(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{where} ({'not UTF-8' if kind == 'non_utf8' else 'empty'})")

    @property
    def skipped(self) -> int:
        return self.empty + self.non_utf8

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.texts} texts"
        where = "; e.g. " + ", ".join(self.examples[:3]) if self.examples else ""
        return f"{self.texts} texts; skipped {self.empty} empty and {self.non_utf8} non-UTF-8 ones{where}"


def decode_utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def record_key(record: Record) -> bytes:
    """The bytes that identify a record (its text, or its messages as canonical JSON)."""
    if record.text is not None:
        return (b"T" if record.eos else b"P") + record.text.encode("utf-8")
    return b"M" + json.dumps(record.messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def corpus_fingerprint(records: Iterable[Record]) -> str:
    """sha256 over the records as read (length-prefixed): equal for two models over the same corpus."""
    h = hashlib.sha256(b"fusekit-corpus/1\n")
    for record in records:
        key = record_key(record)
        h.update(len(key).to_bytes(8, "little"))
        h.update(key)
    return h.hexdigest()


