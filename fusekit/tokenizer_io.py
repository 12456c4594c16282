"""Loading a `tokenizers.Tokenizer` from the places users keep one."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TokenizerNotFound(FileNotFoundError):
    pass


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, or a folder holding one (a Hugging Face model folder)."""
    p = Path(path)
    candidate = p / "tokenizer.json" if p.is_dir() else p
    if not candidate.is_file():
        raise TokenizerNotFound(f"no tokenizer at {p}: expected a tokenizer.json file or a folder containing one")
    return Tokenizer.from_file(str(candidate))
