"""Canonical token strings, so that tokens of different tokenizers compare as text.

Every scheme is mapped to the text the token stands for: byte-level BPE's `Ġ`/`Ċ` and
SentencePiece's `▁`/`<0x0A>` become a real space / newline. A byte that is not valid UTF-8 on its own
(a multi-byte character split across tokens) becomes the private-use code point U+F700 + byte, the same
in every scheme, so that a byte token of one tokenizer still equals the byte token of another.
Special tokens (`<s>`, `<|endoftext|>`, …) are kept as they are.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from functools import lru_cache
from typing import Any, Sequence

STRAY_BYTE_BASE = 0xF700


class Scheme(str, Enum):
    BYTE_LEVEL = "byte_level"  # GPT-2 / Llama-3 / SmolLM: bytes mapped to printable code points
    SENTENCEPIECE = "sentencepiece"  # ▁ word marks, <0xNN> byte fallback (Llama-2, T5, Unigram)
    WORDPIECE = "wordpiece"  # ## continuation marks (BERT)
    PLAIN = "plain"  # tokens are already text


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def _decode_bytes(data: bytes) -> str:
    """UTF-8 where valid; every other byte becomes U+F700 + byte."""
    out: list[str] = []
    i = 0
    while i < len(data):
        for width in (1, 2, 3, 4):
            chunk = data[i : i + width]
            try:
                out.append(chunk.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += width
            break
        else:
            out.append(chr(STRAY_BYTE_BASE + data[i]))
            i += 1
    return "".join(out)


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def normalize_token(tok: str, scheme: Scheme | str) -> str:
    """The canonical text of one token under a tokenizer scheme (see the module docstring)."""
    scheme = Scheme(scheme)
    if scheme is Scheme.BYTE_LEVEL:
        table = _byte_decoder()
        if all(c in table for c in tok):
            return _decode_bytes(bytes(table[c] for c in tok))
        return tok  # an added/special token written in plain text
    if scheme is Scheme.SENTENCEPIECE:
        m = _SP_BYTE.match(tok)
        if m:
            return _decode_bytes(bytes([int(m.group(1), 16)]))
        return tok.replace("▁", " ")
    if scheme is Scheme.WORDPIECE:
        return tok[2:] if tok.startswith("##") else " " + tok
    return tok


def _tokenizer_json(tokenizer: Any) -> dict:
    """The `tokenizers` JSON of a `tokenizers.Tokenizer` or a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        raise TypeError(
            f"cannot read the scheme of {type(tokenizer).__name__}: pass a `tokenizers.Tokenizer` or a "
            "transformers *fast* tokenizer (use_fast=True), or give the scheme explicitly"
        )
    return json.loads(to_str())


def _types(node: Any) -> set[str]:
    """Every component `type` inside a tokenizer JSON node (Sequence components included)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _types(value)
    return found


def token_scheme(tokenizer: Any) -> Scheme:
    """Derive the marker scheme from a `tokenizers` / transformers (fast) tokenizer."""
    return _scheme(_tokenizer_json(tokenizer))


def tokenizer_family(tokenizer: Any) -> str:
    """The fast tokenizer's model type and marker scheme, e.g. "BPE (byte-level)", "Unigram (sentencepiece)"."""
    spec = _tokenizer_json(tokenizer)
    kind = (spec.get("model") or {}).get("type") or "unknown"
    return f"{kind} ({_scheme(spec).value.replace('_', '-')})"


def _scheme(spec: dict) -> Scheme:
    """`token_scheme` of a tokenizer's JSON."""
    parts = _types(spec.get("pre_tokenizer")) | _types(spec.get("decoder"))
    model = spec.get("model") or {}
    if "ByteLevel" in parts:
        return Scheme.BYTE_LEVEL
    if "Metaspace" in parts or model.get("byte_fallback") or model.get("type") == "Unigram":
        return Scheme.SENTENCEPIECE
    if model.get("type") == "WordPiece" or "WordPiece" in parts:
        return Scheme.WORDPIECE
    if "▁" in json.dumps(spec.get("normalizer")):  # Llama-2 style: the normalizer writes ▁
        return Scheme.SENTENCEPIECE
    return Scheme.PLAIN


def normalize_vocab(tokenizer: Any, size: int | None = None) -> list[str]:
    """Canonical strings of ids 0..size−1 (default: the tokenizer's length, added tokens included).

    Ids the tokenizer does not know (a model whose embedding is padded beyond the tokenizer) get "".
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    scheme = token_scheme(tokenizer)
    special = {t.content for t in getattr(backend, "get_added_tokens_decoder", lambda: {})().values() if t.special}
    n = backend.get_vocab_size(with_added_tokens=True) if size is None else size
    out: list[str] = []
    for i in range(n):
        tok = backend.id_to_token(i)
        if tok is None:
            out.append("")
        elif tok in special:
            out.append(tok)
        else:
            out.append(normalize_token(tok, scheme))
    return out


def normalize_tokens(tokens: Sequence[str], scheme: Scheme | str) -> list[str]:
    """`normalize_token` over a sequence."""
    scheme = Scheme(scheme)
    return [normalize_token(t, scheme) for t in tokens]
