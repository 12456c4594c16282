"""`fusekit extract --ray`: shards computed by 2 local Ray workers (one model each) give the serial run's files."""

from __future__ import annotations

import pytest

import fusekit
from fusekit import zoo

pytest.importorskip("ray")


def test_ray_extraction_equals_serial_byte_for_byte(tmp_path, tokenizers_by_kind, corpus_texts, local_cluster):
    model = zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], tmp_path / "m", hidden=32, context=64)
    corpus = tmp_path / "d.txt"
    corpus.write_text("\n".join(t.replace("\n", " ")[: 60 + 40 * i] for i, t in enumerate(corpus_texts[:10])) + "\n")
    kw = dict(top_k=5, max_length=32, batch_size=2, num_shards=4, progress=False)
    serial = fusekit.run_extract(model, corpus, tmp_path / "serial", **kw).out
    # one shard already there: the Ray run does only the other three
    parallel = tmp_path / "ray"
    fusekit.run_extract(model, corpus, parallel, shard="2/4", **{k: v for k, v in kw.items() if k != "num_shards"}).out
    fusekit.run_extract(model, corpus, parallel, ray="auto", ray_workers=2, **kw).out
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in parallel.iterdir())
    for name in names:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
