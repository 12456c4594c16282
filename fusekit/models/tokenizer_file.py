"""Loading a `tokenizers.Tokenizer` from the places users keep one."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TokenizerNotFound(FileNotFoundError):
    pass


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, a folder holding one (a Hugging Face model folder), or a `.gguf` file.

    Raises TokenizerNotFound (a FileNotFoundError) naming the path when none can be read there."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        from fusekit.models.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(p).backend_tokenizer
    candidate = p / "tokenizer.json" if p.is_dir() else p
    if not candidate.is_file():
        raise TokenizerNotFound(f"no tokenizer at {p}: expected a tokenizer.json file, a folder containing one, or a .gguf file")
    try:
        return Tokenizer.from_file(str(candidate))
    except Exception as exc:  # the tokenizers library raises plain Exception on a malformed file
        raise TokenizerNotFound(f"{candidate} is not a readable tokenizer.json ({exc})") from None
