"""The real tokenizers in the project root's sibling `shared/tokenizers/` (vocabulary-only GGUF files).

Not a test module: tests import `real_tokenizer(name)`, which returns the fast tokenizer or skips the
test with the reason it cannot. Each tokenizer is built once per pytest process (2-30 s each, about a
minute for all ten on two cores) into one cache folder shared by every test module: a temporary folder
removed at exit, or `$FUSEKIT_CACHE/tokenizers` when FUSEKIT_CACHE is set (then it persists across runs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

# Short names, as in the files' names `ggml-vocab-<name>.gguf`.
NAMES = (
    "llama-spm",
    "phi-3",
    "mpt",
    "gpt-neox",
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "starcoder",
    "falcon",
    "deepseek-llm",
)


def shared_tokenizers_dir() -> Path:
    """$FUSEKIT_SHARED_TOKENIZERS, else `<project root>/../shared/tokenizers` (may not exist)."""
    env = os.environ.get("FUSEKIT_SHARED_TOKENIZERS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


def gguf_path(name: str) -> Path:
    """The GGUF file of `name`, or `pytest.skip` when the folder or file is absent."""
    if name not in NAMES:
        raise ValueError(f"unknown real tokenizer {name!r}: pick one of {', '.join(NAMES)}")
    folder = shared_tokenizers_dir()
    if not folder.is_dir():
        pytest.skip(f"real tokenizers not available: {folder} is absent (set FUSEKIT_SHARED_TOKENIZERS)")
    path = folder / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"real tokenizer {name!r} not available: {path} is absent")
    return path


@lru_cache(maxsize=1)
def cache_dir() -> Path:
    """$FUSEKIT_CACHE/tokenizers when FUSEKIT_CACHE is set, else one temporary folder for this process."""
    root = os.environ.get("FUSEKIT_CACHE")
    if root:
        return Path(root) / "tokenizers"
    folder = Path(tempfile.mkdtemp(prefix="fusekit-real-tokenizers-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@lru_cache(maxsize=None)
def _load(path: Path, cache_dir: Path):
    from fusekit.models.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(path, cache_dir=cache_dir)


def real_tokenizer(name: str):
    """The `transformers` fast tokenizer of `name` (one of `NAMES`), loaded once per process.

    Returns a `transformers.PreTrainedTokenizerFast` whose ids are the GGUF file's (see
    `fusekit.models.gguf_tokenizer`); callers share it, so do not mutate it. Skips the calling test when the
    shared folder or the file is absent.
    """
    return _load(gguf_path(name), cache_dir())
