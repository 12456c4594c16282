"""Reading evaluation data: a text file (one text per non-empty line), a folder of text files (one
text per file), JSONL (a text field, or `messages` chat records), or Parquet (a text column).

Chat records become the model's chat template; only assistant tokens are scored (FuseChat).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


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


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    data = path.read_bytes()
    whole = _decode(data)
    # A valid file splits exactly as str.splitlines; only a file with bad bytes is decoded line by line.
    if whole is not None:
        chunks = list(enumerate(whole.splitlines(), 1))
    else:
        chunks = []
        for n, raw in enumerate(data.splitlines(), 1):
            line = _decode(raw)
            if line is None:
                stats.skip("non_utf8", f"{path}:{n}")
                continue
            chunks.extend((n, part) for part in (line.splitlines() or [""]))
    for n, line in chunks:
        if line.strip():
            yield line
        else:
            stats.skip("empty", f"{path}:{n}")


def read_records(data: str | Path, field: str = "text", stats: CorpusStats | None = None) -> Iterator[Record]:
    """The corpus's records in order. Empty and non-UTF-8 texts are skipped and counted in `stats`."""
    stats = stats if stats is not None else CorpusStats()
    for record in _read_records(Path(data), field, stats):
        stats.texts += 1
        yield record


def _read_records(path: Path, field: str, stats: CorpusStats) -> Iterator[Record]:
    if not path.exists():
        raise CorpusError(f"no data at {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        for f in files:
            text = _decode(f.read_bytes())
            if text is None:
                stats.skip("non_utf8", str(f))
            elif not text.strip():
                stats.skip("empty", str(f))
            else:
                yield Record(text=text)
    elif path.suffix in (".jsonl", ".json"):
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw)
                if line is None:
                    stats.skip("non_utf8", f"{path}:{lineno}")
                    continue
                if not line.strip():
                    continue  # a blank line between records is not a text
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from None
                if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                    if obj["messages"]:
                        yield Record(messages=obj["messages"])
                    else:
                        stats.skip("empty", f"{path}:{lineno}")
                elif isinstance(obj, dict) and isinstance(obj.get(field), str):
                    if obj[field].strip():
                        yield Record(text=obj[field], eos=obj.get("eos") is not False)
                    else:
                        stats.skip("empty", f"{path}:{lineno}")
                else:
                    raise CorpusError(f"{path}:{lineno} has neither a string {field!r} field nor a 'messages' list")
    elif path.suffix == ".parquet":
        import polars as pl

        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # polars raises its own types for damaged files
            raise CorpusError(f"cannot read {path} as Parquet: {exc}") from None
        if field not in frame.columns:
            raise CorpusError(f"{path} has no column {field!r} (columns: {', '.join(frame.columns)})")
        if frame.schema[field] not in (pl.String, pl.Null):
            raise CorpusError(f"{path}: column {field!r} holds {frame.schema[field]}, not text")
        for row, text in enumerate(frame[field].to_list()):
            if isinstance(text, str) and text.strip():
                yield Record(text=text)
            else:
                stats.skip("empty", f"{path} row {row}")
    else:
        for line in _text_lines(path, stats):
            yield Record(text=line)


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


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns."""
    template = getattr(tokenizer, "chat_template", None)

    def render(msgs: list[dict]) -> str:
        if template:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs)  # templateless tokenizers

    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            before = len(render(messages[:i])) if i else 0
            spans.append((before, len(render(messages[: i + 1]))))
    return render(messages), spans


@dataclass
class TokenizedText:
    """A record as the model sees it: the text, its tokens and where each token starts in it."""

    text: str  # the plain text, or the chat rendered by the tokenizer's template
    input_ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n]: character (code point) offset where each token starts
    mask: np.ndarray | None  # bool [n] for chat records: the assistant tokens


def tokenize_with_offsets(tokenizer, record: Record, append_eos: bool = False) -> TokenizedText:
    """Tokenise the whole text once without special tokens, so offsets are plain text positions.

    `append_eos`: a plain text (not a chat record, whose template ends its turns itself) gets the
    tokenizer's end-of-sequence token after its last character (offset len(text)), as the FuseLLM
    reference does, so a model learns where documents end. Needs a fast tokenizer (offsets come from its
    Rust backend).
    """
    if record.text is not None:
        text, spans = record.text, None
    else:
        text, spans = _render_chat(tokenizer, record.messages or [])
    # verbose=False: whole texts are tokenised on purpose (windows are cut afterwards), so no "longer than the
    # maximum sequence length" warning.
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    offsets = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
    mask = None
    if spans is not None:
        mask = np.zeros(len(offsets), dtype=bool)
        for lo, hi in spans:
            mask |= (offsets >= lo) & (offsets < hi)
    ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and record.text is not None and record.eos and isinstance(eos, int):
        ids = np.append(ids, np.int64(eos))
        offsets = np.append(offsets, np.int64(len(text)))
    return TokenizedText(text, ids, offsets, mask)


def tokenize_record(tokenizer, record: Record, append_eos: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids (no special tokens added: windows as extraction cuts them; the end-of-sequence token
    after a plain text with `append_eos`) and, for chat records, a mask of the assistant tokens."""
    if record.text is not None and not append_eos:
        return np.asarray(tokenizer(record.text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64), None
    tokenized = tokenize_with_offsets(tokenizer, record, append_eos)
    return tokenized.input_ids, tokenized.mask


def windows_of(ids: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """Consecutive non-overlapping windows of at most max_length tokens."""
    return [(s, min(len(ids), s + max_length)) for s in range(0, len(ids), max_length)]
