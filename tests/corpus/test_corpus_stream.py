"""The streaming corpus reader: the same texts, ids and fingerprint as a whole-file read in every format;
shard reads that cover the corpus exactly once from their own parts; bad inputs named."""

from __future__ import annotations

import json
import os

import pytest

import corpus_files as cf
from fusekit.corpus import CorpusError, RangeReader, corpus_fingerprint, open_source, read_range, read_records, scan
from fusekit.store.shards import shard_slice

# Computed by the whole-file reader fusekit had before it streamed (fusekit/corpus.py at 0118768) on the
# corpora below: stores written then carry these, so a resume must find them unchanged.
OLD_FINGERPRINTS = {
    "lines": "3aa96eadcd99cb06f5cb0a460f56d32afa6959404e565704779fef0f28e36906",
    "jsonl": "d7ca32a35d2365a1a034a384a7d444c004b952c10667827e006904dbec1a23af",
    "parquet": "a30e102381cf7e242d81ebe95fdc2c2e89c93aba5fb7aeb52248dc2fc507e18f",
    "folder": "a14aaec0ab9fc3f6f7c376891d0b1b1488b55076e02d578f55c8cea0adfa23b5",
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """name → (DATA, the texts a whole-file read gives), one per format and layout."""
    d = tmp_path_factory.mktemp("corpora")
    texts = cf.texts_of(60)
    pq_texts = [None if i == 4 else t for i, t in enumerate(texts)]
    folder = d / "folder"
    folder.mkdir()
    for i, t in enumerate(texts[:20]):
        (folder / f"{i:03d}.txt").write_text(t)
    (folder / "sub").mkdir()
    (folder / "sub" / "z.md").write_text("a nested markdown file")
    pq_folder = d / "pq"
    shards = [cf.write_parquet(pq_folder / f"part-{i}.parquet", texts[i * 20 : (i + 1) * 20], row_group_size=6) for i in range(3)]
    hub = d / "datasets--me--corpus"
    snap = hub / "snapshots" / "abc123"
    hub_files = [cf.write_parquet(snap / "data" / f"train-{i:05d}-of-00002.parquet", texts[i * 30 : (i + 1) * 30]) for i in range(2)]
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    saved = cf.write_saved_dataset(d / "saved", [texts[:25], texts[25:]])
    jsonl = cf.write_jsonl(d / "c.jsonl", texts)
    return {
        "lines": (cf.write_lines(d / "c.txt"), cf.whole_lines(d / "c.txt")),
        "jsonl": (jsonl, cf.whole_jsonl(jsonl)),
        "folder": (folder, [t for t in texts[:20] if t.strip()] + ["a nested markdown file"]),
        "parquet": (cf.write_parquet(d / "c.parquet", pq_texts), cf.whole_parquet([d / "c.parquet"])),
        "parquet folder": (pq_folder, cf.whole_parquet(shards)),
        "parquet glob": (str(pq_folder / "part-*.parquet"), cf.whole_parquet(shards)),
        "hub cache": (hub, cf.whole_parquet(hub_files)),
        "saved dataset": (saved, cf.whole_arrow([saved / "data-00000-of-00002.arrow", saved / "data-00001-of-00002.arrow"])),
    }


def _bounds(n_texts: int, i: int, n: int) -> tuple[int, int]:
    r = shard_slice(n_texts, i, n)
    return r.start, r.stop


def _as_read(records) -> list:
    return [r.text if r.text is not None else ("M", json.dumps(r.messages)) for r in records]


def _expected(name, whole) -> list:
    if name == "jsonl":  # chat records and cut pieces: compare kind and text
        return [t if k == "T" else (k, t) if k == "M" else t for k, t in whole]
    return whole


@pytest.mark.parametrize("name", ["lines", "jsonl", "folder", "parquet", "parquet folder", "parquet glob", "hub cache", "saved dataset"])
@pytest.mark.parametrize("part_bytes", [None, 200])
def test_streamed_records_are_the_whole_file_reads(corpora, name, part_bytes, monkeypatch):
    if part_bytes:  # many small parts inside one line file: boundaries must not move or lose a line
        monkeypatch.setattr("fusekit.corpus.lines.PART_BYTES", part_bytes)
    data, whole = corpora[name]
    got = list(read_records(data))
    assert _as_read(got) == _expected(name, whole)
    if name == "jsonl":
        assert [r.eos for r in got if r.text is not None].count(False) == 1
    index = scan(open_source(data), "text")
    assert index.n_texts == len(whole) and index.fingerprint == corpus_fingerprint(got)
    if name in OLD_FINGERPRINTS:
        assert index.fingerprint == OLD_FINGERPRINTS[name]
    if part_bytes and name in ("lines", "jsonl"):
        assert len(index.parts) > 5


@pytest.mark.parametrize("name", ["lines", "jsonl", "folder", "parquet folder", "saved dataset"])
def test_shard_reads_cover_the_corpus_exactly_once(corpora, name, monkeypatch):
    monkeypatch.setattr("fusekit.corpus.lines.PART_BYTES", 300)
    monkeypatch.setattr("fusekit.corpus.lines.FILES_PER_PART", 3)
    monkeypatch.setattr("fusekit.corpus.columnar.BATCH_ROWS", 4)
    data, _ = corpora[name]
    source = open_source(data)
    index = scan(source, "text")
    every = _as_read(read_records(data))
    for n in (1, 3, 7, index.n_texts):
        pieces = [_as_read(read_range(source, "text", index, r.start, r.stop)) for r in (shard_slice(index.n_texts, i, n) for i in range(n))]
        assert [len(p) for p in pieces] == [len(shard_slice(index.n_texts, i, n)) for i in range(n)]
        assert [t for p in pieces for t in p] == every
        # One reader for consecutive shards (as an extraction job reads them) continues its stream.
        reader = RangeReader(source, "text", index)
        assert [t for i in range(n) for t in _as_read(reader.read(*_bounds(index.n_texts, i, n)))] == every


def test_a_real_datasets_save_to_disk_folder(tmp_path, monkeypatch):
    """A folder `datasets` itself wrote (shuffled, so its rows are not in creation order; 3 Arrow files)
    reads as `load_from_disk` gives it, in parts that shard jobs cover exactly once; its DatasetDict is
    refused with the splits named. Without `datasets` installed, `test_streamed_records_…[saved dataset]`
    covers the same layout written by pyarrow."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr("fusekit.corpus.columnar.BATCH_ROWS", 4)
    texts = cf.texts_of(45)
    texts[9] = None
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).shuffle(seed=3)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    expected = [t for t in datasets.load_from_disk(str(tmp_path / "ds"))["text"] if isinstance(t, str) and t.strip()]
    assert expected != [t for t in texts if isinstance(t, str) and t.strip()]  # shuffled: order comes from the files
    got = _as_read(read_records(tmp_path / "ds"))
    assert got == expected
    source = open_source(tmp_path / "ds")
    assert source.kind == "arrow" and len(source.files) == 3
    index = scan(source, "text")
    assert index.n_texts == len(expected) and len(index.parts) == 3  # a part per record batch: one per file here
    for n in (2, 5):
        pieces = [_as_read(read_range(source, "text", index, *_bounds(index.n_texts, i, n))) for i in range(n)]
        assert [t for p in pieces for t in p] == expected
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=r"DatasetDict with the splits train, validation: give one split's folder"):
        list(read_records(tmp_path / "dd"))
    assert _as_read(read_records(tmp_path / "dd" / "validation")) == expected


def test_a_shard_reads_only_its_own_files(tmp_path):
    """After the scan, the first file is destroyed: a shard whose texts are in the last file still reads."""
    texts = cf.texts_of(40)
    files = [cf.write_parquet(tmp_path / f"p{i}.parquet", texts[i * 20 : (i + 1) * 20]) for i in range(2)]
    source = open_source(tmp_path)
    index = scan(source, "text")
    files[0].write_bytes(b"gone")
    last = shard_slice(index.n_texts, 3, 4)
    assert _as_read(read_range(source, "text", index, last.start, last.stop)) == cf.whole_parquet(files[1:])[-len(last):]
    with pytest.raises(CorpusError, match="p0.parquet"):
        list(read_range(source, "text", index, 0, 2))


def test_bad_corpora_are_named(tmp_path):
    texts = cf.texts_of(30)
    good = tmp_path / "good"
    cf.write_parquet(good / "a.parquet", texts[:15])
    cf.write_parquet(good / "b.parquet", texts[15:])
    # A damaged file among good ones: named, and nothing read past it silently.
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.parquet", "b.parquet"):
        (bad / name).write_bytes((good / name).read_bytes())
    data = bytearray((good / "b.parquet").read_bytes())
    data[-12:-8] = b"\xff\xff\xff\x7f"  # the footer's length: the file cannot be opened
    (bad / "b.parquet").write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"cannot read .*b\.parquet as Parquet"):
        list(read_records(bad))
    # A damaged page, found while reading: the file and row group are named.
    (bad / "b.parquet").write_bytes((good / "b.parquet").read_bytes())
    _damage_a_page(bad / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet \(row group \d+\)"):
        list(read_records(bad))
    # A missing column lists the columns there are; files of one folder with another schema are named.
    with pytest.raises(CorpusError, match=r"a\.parquet has no column 'body' \(columns: id, text\)"):
        list(read_records(good, "body"))
    mixed = tmp_path / "mixed"
    cf.write_parquet(mixed / "a.parquet", texts[:5])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": texts[5:10]}), mixed / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet has no column 'text' \(columns: content\); 1 other file"):
        list(read_records(mixed))
    pq.write_table(pa.table({"text": [1, 2]}), mixed / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet: column 'text' holds int64, not text"):
        list(read_records(mixed))
    with pytest.raises(CorpusError, match="no files match"):
        list(read_records(str(tmp_path / "nothing-*.parquet")))
    splits = tmp_path / "splits"
    cf.write_parquet(splits / "train-0.parquet", texts[:5])
    cf.write_parquet(splits / "test-0.parquet", texts[5:10])
    with pytest.raises(CorpusError, match="holds the splits test, train"):
        list(read_records(splits))
    both = tmp_path / "both"
    cf.write_parquet(both / "a.parquet", texts[:5])
    (both / "b.txt").write_text("a text")
    with pytest.raises(CorpusError, match=r"mixes formats \(1 files, 1 parquet files\)"):
        list(read_records(both))


def test_datasets_folders_of_another_format_are_named(tmp_path):
    texts = cf.texts_of(10)
    d = tmp_path / "dd"
    cf.write_saved_dataset(d / "train", [texts])
    cf.write_saved_dataset(d / "test", [texts])
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(CorpusError, match=r"DatasetDict with the splits test, train: give one split's folder"):
        list(read_records(d))
    assert len(list(read_records(d / "train"))) == len([t for t in texts if t.strip()])
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.parquet"}]}))
    with pytest.raises(CorpusError, match="a `datasets` folder of another format"):
        list(read_records(other))
    (other / "state.json").write_text(json.dumps({"version": 9}))
    with pytest.raises(CorpusError, match="not a `datasets` save_to_disk state"):
        list(read_records(other))


def test_streaming_keeps_memory_to_a_batch(tmp_path):
    """120 MB of text in one Parquet row group is read with memory far below its size (after a warm-up read
    of a small file, which pays the allocator's one-time growth)."""
    import subprocess
    import sys

    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    cf.write_parquet(small, [f"{i} " + "word " * 3000 for i in range(500)], row_group_size=500)
    cf.write_parquet(big, [f"{i} " + "word " * 3000 for i in range(8000)], row_group_size=8000)
    code = (
        "import sys; from fusekit._procmem import memory_mb, reset_peak; from fusekit.corpus import read_records\n"
        "sum(1 for _ in read_records(sys.argv[1]))\n"
        "reset_peak(); before = memory_mb()['VmRSS']\n"
        "n = sum(1 for _ in read_records(sys.argv[2]))\n"
        "print(n, memory_mb()['VmHWM'] - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(small), str(big)], capture_output=True, text=True, check=True, env=os.environ).stdout.split()
    assert int(out[0]) == 8000
    assert float(out[1]) < 64, f"reading 120 MB of text grew RSS by {out[1]} MiB"


def _damage_a_page(path) -> None:
    """Overwrite bytes in the middle of the data pages (not the footer): opening works, reading fails."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(meta.num_row_groups - 1).column(1)
    start = col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
