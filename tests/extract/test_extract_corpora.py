"""`fusekit extract` over a Parquet folder: shard jobs read their own parts through the saved corpus index
and store what a run over the same texts as JSONL stores; a damaged file stops the run before any shard."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import corpus_files as cf
import fusekit
from fusekit import zoo
from fusekit.corpus import CorpusError
from fusekit.extract import ExtractStore
from fusekit.extract.corpus_shards import scan_corpus
from fusekit.store.shards import CORPUS_INDEX, verify_store


@pytest.fixture(scope="module")
def setup(tokenizers_by_kind, tmp_path_factory, corpus_texts):
    root = tmp_path_factory.mktemp("pqx")
    model = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "m", hidden=16, context=64)
    texts = [t.replace("\n", " ")[:150] for t in corpus_texts[:18]]
    texts[5] = "   "  # skipped: ids after it shift in both readers alike
    folder = root / "pq"
    for i in range(3):
        cf.write_parquet(folder / f"part-{i}.parquet", texts[i * 6 : (i + 1) * 6], row_group_size=2)
    jsonl = root / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return model, folder, jsonl


def test_shard_jobs_over_a_parquet_folder_store_what_a_jsonl_run_stores(setup, tmp_path):
    model, folder, jsonl = setup
    kw = dict(top_k=3, max_length=16, progress=False)
    whole = ExtractStore(fusekit.run_extract(model, jsonl, tmp_path / "whole", num_shards=3, **kw).out)
    out = tmp_path / "split"
    fusekit.run_extract(model, folder, out, shard="2/3", **kw).out
    assert (out / CORPUS_INDEX).is_file()
    assert scan_corpus(folder, "text", out).from_cache  # later jobs of this store read only their parts
    for i in (0, 1):
        fusekit.run_extract(model, folder, out, shard=f"{i}/3", **kw).out
    split = ExtractStore(out)
    assert split.complete() and verify_store(out) == []  # the saved index is no foreign file
    assert split.corpus_fingerprint == whole.corpus_fingerprint and split.n_texts == whole.n_texts == 17
    for (ta, wa), (tb, wb) in zip(whole.iter_texts(), split.iter_texts()):
        assert ta == tb
        np.testing.assert_array_equal(np.concatenate([w.input_ids for w in wa]), np.concatenate([w.input_ids for w in wb]))
    # A corpus file changed since the scan: the saved index no longer holds, the corpus is read again.
    first = folder / "part-0.parquet"
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not scan_corpus(folder, "text", out).from_cache


def test_a_damaged_file_stops_extraction_before_any_shard(setup, tmp_path):
    model, folder, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in sorted(folder.iterdir()):
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "part-1.parquet").write_bytes((bad / "part-1.parquet").read_bytes()[:-30])
    out = tmp_path / "s"
    with pytest.raises(CorpusError, match=r"cannot read .*part-1\.parquet as Parquet"):
        fusekit.run_extract(model, bad, out, top_k=3, max_length=16, progress=False).out
    assert not out.exists() or not list(out.glob("part-*"))


def test_shards_beyond_the_count_stop_before_anything_is_written(setup, tmp_path):
    """--shard I/N with I ≥ N, and N above the folder's 17 texts: refused, and no shard file appears."""
    from fusekit.extract import ExtractError
    from fusekit.store import StoreError

    model, folder, _ = setup
    out = tmp_path / "s"
    with pytest.raises(StoreError, match=r"--shard 3/3: shards are numbered 0\.\.2"):
        fusekit.run_extract(model, folder, out, shard="3/3", top_k=3, max_length=16, progress=False).out
    with pytest.raises(ExtractError, match="18 shards for 17 texts: some shards would be empty; use at most 17"):
        fusekit.run_extract(model, folder, out, shard="17/18", top_k=3, max_length=16, progress=False).out
    assert not list(out.glob("part-*"))
