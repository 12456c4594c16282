"""Streaming readers of the line formats (a text file, JSONL) and of folders of text files, from any part.

Line files are read line by line (split at b"\\n", which never occurs inside a UTF-8 character), so memory
holds one line at a time; each line is then split as `str.splitlines` would split the whole file, so the
texts and their order are those of a whole-file read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from fusekit.corpus.parts import FILES_PER_PART, PART_BYTES, Part
from fusekit.corpus.records import CorpusError, CorpusStats, Record, decode_utf8
from fusekit.corpus.sources import Source


def line_records(raw: bytes, kind: str, field: str, where: str, stats: CorpusStats) -> list[Record]:
    """The records of one physical line (with its b"\\n") of a `lines` or `jsonl` file; skips are counted."""
    line = decode_utf8(raw)
    if line is None:
        stats.skip("non_utf8", where)
        return []
    if kind == "lines":
        out = []
        for piece in line.splitlines() or [""]:
            if piece.strip():
                out.append(Record(text=piece))
            else:
                stats.skip("empty", where)
        return out
    if not line.strip():
        return []  # a blank line between records is not a text
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where} is not valid JSON: {exc.msg}") from None
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        if obj["messages"]:
            return [Record(messages=obj["messages"])]
    elif isinstance(obj, dict) and isinstance(obj.get(field), str):
        if obj[field].strip():
            return [Record(text=obj[field], eos=obj.get("eos") is not False)]
    else:
        raise CorpusError(f"{where} has neither a string {field!r} field nor a 'messages' list")
    stats.skip("empty", where)
    return []


def stream_lines(source: Source, field: str, stats: CorpusStats, start: Part) -> Iterator[tuple[Part, Record]]:
    """(part, record) for every record of a `lines` or `jsonl` source from part `start` on."""
    for fi in range(start.file, len(source.files)):
        path = source.files[fi]
        pos, lineno = (start.pos, start.line) if fi == start.file else (0, 1)
        part, cut = Part(fi, pos, lineno), (pos // PART_BYTES + 1) * PART_BYTES
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None
        with fh:
            fh.seek(pos)
            for raw in fh:
                if pos >= cut:
                    part, cut = Part(fi, pos, lineno), (pos // PART_BYTES + 1) * PART_BYTES
                for record in line_records(raw, source.kind, field, f"{path}:{lineno}", stats):
                    yield part, record
                pos += len(raw)
                lineno += 1


def file_record(path: Path, stats: CorpusStats) -> Record | None:
    """A text file as one record, or None (counted) when it is empty or not UTF-8."""
    try:
        text = decode_utf8(path.read_bytes())
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None
    if text is None:
        stats.skip("non_utf8", str(path))
    elif not text.strip():
        stats.skip("empty", str(path))
    else:
        return Record(text=text)
    return None


def stream_files(source: Source, stats: CorpusStats, start: Part) -> Iterator[tuple[Part, Record]]:
    """(part, record) for every text file of a `files` source from part `start` on (one text per file)."""
    for fi in range(start.file, len(source.files)):
        record = file_record(source.files[fi], stats)
        if record is not None:
            yield Part(fi - fi % FILES_PER_PART, 0, 1), record
