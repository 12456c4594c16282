"""Reading evaluation data: a text file (one text per non-empty line), a folder of text files (one
text per file), JSONL (a text field, or `messages` chat records), or Parquet (a text column).

Chat records become the model's chat template; only assistant tokens are scored (FuseChat).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


class CorpusError(ValueError):
    """Data that cannot be read as a corpus, with what is wrong and where."""


@dataclass
class Record:
    text: str | None = None
    messages: list[dict] | None = None


def read_records(data: str | Path, field: str = "text") -> Iterator[Record]:
    path = Path(data)
    if not path.exists():
        raise CorpusError(f"no data at {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Record(text=text)
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from None
                if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                    yield Record(messages=obj["messages"])
                elif isinstance(obj, dict) and isinstance(obj.get(field), str):
                    yield Record(text=obj[field])
                else:
                    raise CorpusError(f"{path}:{lineno} has neither a string {field!r} field nor a 'messages' list")
    elif path.suffix == ".parquet":
        import polars as pl

        frame = pl.read_parquet(path)
        if field not in frame.columns:
            raise CorpusError(f"{path} has no column {field!r} (columns: {', '.join(frame.columns)})")
        for text in frame[field].to_list():
            if isinstance(text, str) and text.strip():
                yield Record(text=text)
    else:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                yield Record(text=line)


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


def tokenize_record(tokenizer, record: Record) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids and, for chat records, a mask of the assistant tokens."""
    if record.text is not None:
        return np.asarray(tokenizer(record.text)["input_ids"], dtype=np.int64), None
    text, spans = _render_chat(tokenizer, record.messages or [])
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    starts = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return np.asarray(enc["input_ids"], dtype=np.int64), mask


def windows_of(ids: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """Consecutive non-overlapping windows of at most max_length tokens."""
    return [(s, min(len(ids), s + max_length)) for s in range(0, len(ids), max_length)]
