"""Not a test module: one small corpus written in every format fusekit reads, and the whole-file reads
(the reader fusekit had before it streamed: read each file whole, then split) the streaming reader must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXTS = [
    "plain ASCII text about lists and tuples",
    "CJK 漢字かな交じり文 and Hangul 한국어",
    "emoji 👍🏽 and a family 👨‍👩‍👧 in one text",
    "combining marks: e\u0301 a\u0308 n\u0303",
    "   ",  # whitespace only: skipped
    "",  # empty: skipped
    "tab\tinside and a CRLF\r\nbetween two halves",
    "a",
    "long " * 700,
    "byte fallback \x00\x01 control characters \u2603",
]
LINES_BYTES = (
    b"first line\r\n"
    b"CJK \xe6\xbc\xa2\xe5\xad\x97 line\n"
    b"\n"
    b"   \n"
    b"caf\xe9 is latin-1, not UTF-8\n"
    b"one\rline split by a bare CR\n"
    b"emoji \xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\r\n"
    b"\xe2\x80\xa8 after a line separator\n"
    b"last line without a newline"
)


def texts_of(n: int) -> list[str]:
    """`n` texts cycling through TEXTS with a counter, so texts differ and parts hold many."""
    return [f"{i} {t}" if t.strip() and i % 7 else t for i, t in ((i, TEXTS[i % len(TEXTS)]) for i in range(n))]


def write_lines(path: Path) -> Path:
    path.write_bytes(LINES_BYTES * 40)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    rows = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    rows.insert(3, "")  # a blank line between records
    rows.insert(5, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    rows.insert(6, json.dumps({"text": "a cut piece", "eos": False}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str | None], row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_saved_dataset(folder: Path, chunks: list[list[str]], batch_rows: int = 5) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC streams listed in state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, texts in enumerate(chunks):
        name = f"data-{i:05d}-of-{len(chunks):05d}.arrow"
        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    return folder


def whole_lines(path: Path) -> list[str]:
    """A text file read whole: split as str.splitlines (line by line where the file is not UTF-8)."""
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = []
        for raw in data.splitlines():
            try:
                lines.extend(raw.decode("utf-8").splitlines())
            except UnicodeDecodeError:
                pass
    return [line for line in lines if line.strip()]


def whole_jsonl(path: Path) -> list[tuple]:
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            obj = json.loads(line)
            if "messages" in obj:
                out.append(("M", json.dumps(obj["messages"])))
            elif obj["text"].strip():
                out.append(("T" if obj.get("eos", True) else "P", obj["text"]))
    return out


def whole_parquet(files: list[Path], field: str = "text") -> list[str]:
    import polars as pl

    return [t for f in files for t in pl.read_parquet(f)[field].to_list() if isinstance(t, str) and t.strip()]


def whole_arrow(files: list[Path], field: str = "text") -> list[str]:
    import pyarrow as pa

    out = []
    for f in files:
        with pa.OSFile(str(f)) as src:
            out.extend(t for t in pa.ipc.open_stream(src).read_all()[field].to_pylist() if isinstance(t, str) and t.strip())
    return out
