"""`fusekit align --ray`: shards as Ray tasks on a local 2-CPU cluster write the serial run's files."""

from __future__ import annotations

import pytest

import fusekit
from align_store_data import extract_three

pytest.importorskip("ray")


def test_ray_run_equals_serial_byte_for_byte(tmp_path, tokenizers_by_kind, corpus_texts, local_cluster):
    data = extract_three(tmp_path, tokenizers_by_kind, [t[:800] for t in corpus_texts[:6]], k=4, window=64)
    s = data["stores"]
    args = (s["bpe"], [s["unigram"], s["wordpiece"]])
    kw = dict(num_shards=3, workers=1, vocab_map_cache=tmp_path / "cache", progress=False)
    fusekit.run_align(*args, tmp_path / "serial", **kw).report
    report = fusekit.run_align(*args, tmp_path / "ray", ray="auto", **kw).report
    names = sorted(p.name for p in (tmp_path / "serial").iterdir() if p.name != "timings.json")
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir() if p.name != "timings.json")
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert report["run"]["shards"] == [0, 1, 2] and report["run"]["ray"] == "auto"
    # Everything complete: a second Ray run has nothing to do.
    again = fusekit.run_align(*args, tmp_path / "ray", ray="auto", **kw).report
    counts = lambda r: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in r["sources"]]  # noqa: E731
    assert again["run"]["shards"] == [] and counts(again) == counts(report)
