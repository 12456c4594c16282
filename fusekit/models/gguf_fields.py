"""Reading a GGUF file's metadata fields (`general.architecture`, `tokenizer.ggml.*`) as Python values.

GGUF (llama.cpp's single-file model format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
keeps the vocabulary as metadata: `tokenizer.ggml.tokens` / `.merges` (string arrays), `.token_type`,
`.model`, `.pre` and the special-token ids. gguf_tokenizer.py builds a fast tokenizer from them.
"""

from __future__ import annotations

import struct
from pathlib import Path


class GGUFTokenizerError(ValueError):
    """A GGUF file whose vocabulary cannot be turned into a fast tokenizer."""


_STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def read_fields(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, object]:
    """GGUF metadata values for `keys`, or all `tokenizer.*` keys and `general.architecture`.

    Strings come decoded, arrays as lists. Uses transformers' metadata reader (under a second for
    a 152k vocabulary; `gguf.GGUFReader` takes 10-20 s on one busy core), else `gguf.GGUFReader`.
    """
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # an older or newer transformers without it
        return read_fields_gguf(path, keys)
    wanted = _STRING_ARRAYS if keys is None else tuple(k for k in keys if k in _STRING_ARRAYS)
    try:
        metadata, _ = read_gguf_metadata(str(path), wanted)
    except (ValueError, struct.error) as exc:
        raise GGUFTokenizerError(f"cannot read GGUF metadata from {path}: {exc}") from exc
    if keys is None:
        return {k: v for k, v in metadata.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    return {k: metadata[k] for k in keys if k in metadata}


def read_fields_gguf(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, object]:
    """`read_fields` through `gguf.GGUFReader` (the fallback where transformers has no metadata reader)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        if keys is not None and name not in keys:
            continue
        if keys is None and not (name.startswith("tokenizer.") or name == "general.architecture"):
            continue
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[name] = [field.parts[i][0].item() for i in field.data]
        elif field.types[0] == GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[name] = field.parts[field.data[0]][0].item()
    return out


def gguf_vocab_size(path: str | Path) -> int:
    """Number of entries in the file's `tokenizer.ggml.tokens` (the model's embedding rows, padding included)."""
    tokens = read_fields(Path(path), ("tokenizer.ggml.tokens",)).get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFTokenizerError(f"{path} has no tokenizer.ggml.tokens: it holds no vocabulary")
    return len(tokens)  # type: ignore[arg-type]
