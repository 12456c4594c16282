"""What every id of a vocabulary is, for moving probability mass between tokenizers.

Three facts about an id decide whether mass may land on it, beyond its text:

* **kind**: ordinary text, a SentencePiece *byte-fallback* piece (`<0x2C>`), a special token (`</s>`,
  `<|im_end|>`), or an *empty* id (a padded embedding row the tokenizer does not know);
* **twins**: a byte-fallback piece whose text another ordinary token also has (`<0x2C>` and `,`) is never
  emitted by the tokenizer for that text — the ordinary token is preferred, and the twin takes no mass;
* **roles**: special tokens map by role, never by their spelling: end of sequence (`eos`) and end of a chat
  turn (`eot`: `<|im_end|>`, `<|eot_id|>`, `<|end|>`, … — what the model's chat template puts after an
  assistant message; often the same id as `eos`).

`VocabInfo` is built from a tokenizer (the text-level API) or read from an extraction store, which keeps
it beside the vocabulary (`tokens.json`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from fusekit.vocab.normalize import STRAY_BYTE_BASE, Scheme, normalize_token, token_scheme

TEXT, BYTE_FALLBACK, SPECIAL, EMPTY = 0, 1, 2, 3
_SP_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
# End-of-turn spellings of the common chat templates (ChatML, Llama-3, Phi-3, Gemma, DeepSeek), for a
# tokenizer without a chat template to probe.
_EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|EOT|>", "<｜end▁of▁sentence｜>")


_STRAY_BYTE = re.compile(f"[{chr(STRAY_BYTE_BASE)}-{chr(STRAY_BYTE_BASE + 0xFF)}]")


def token_bytes(normalised: str) -> bytes:
    """The bytes a normalised token stands for (stray bytes U+F700+b back to the byte b)."""
    if _STRAY_BYTE.search(normalised) is None:  # the common case, found at C speed (whole vocabularies pass here)
        return normalised.encode("utf-8", "surrogatepass")
    out = bytearray()
    for c in normalised:
        o = ord(c)
        out += bytes([o - STRAY_BYTE_BASE]) if STRAY_BYTE_BASE <= o <= STRAY_BYTE_BASE + 0xFF else c.encode("utf-8", "surrogatepass")
    return bytes(out)


@dataclass(frozen=True)
class VocabInfo:
    """A vocabulary as the transfer sees it. `strings[id]` is the normalised text (see normalize.py)."""

    strings: list[str]
    kind: np.ndarray  # uint8 [V]: TEXT, BYTE_FALLBACK, SPECIAL, EMPTY
    eos: int | None  # the end-of-sequence id, mapped by role
    eot: int | None = None  # the end-of-turn id of the chat template (may equal eos), mapped by role

    def __len__(self) -> int:
        return len(self.strings)

    @cached_property
    def bytes(self) -> list[bytes]:
        """Byte strings; special and empty ids have none (they never match text)."""
        return [token_bytes(s) if k in (TEXT, BYTE_FALLBACK) else b"" for s, k in zip(self.strings, self.kind.tolist())]

    @cached_property
    def twin(self) -> np.ndarray:
        """bool [V]: byte-fallback ids whose text an ordinary token also has (never emitted for it)."""
        text = {s for s, k in zip(self.strings, self.kind.tolist()) if k == TEXT}
        return np.fromiter((k == BYTE_FALLBACK and s in text for s, k in zip(self.strings, self.kind.tolist())), bool, len(self.strings))

    @cached_property
    def usable(self) -> np.ndarray:
        """bool [V]: ids that may receive mass by their text (ordinary tokens and twin-less byte pieces)."""
        return ((self.kind == TEXT) | (self.kind == BYTE_FALLBACK)) & ~self.twin

    def as_json(self) -> dict:
        """What an extraction store keeps in tokens.json."""
        return {
            "byte_fallback": np.flatnonzero(self.kind == BYTE_FALLBACK).tolist(),
            "special": np.flatnonzero(self.kind == SPECIAL).tolist(),
            "empty": np.flatnonzero(self.kind == EMPTY).tolist(),
            "eos": self.eos,
            "eot": self.eot,
        }

    @classmethod
    def from_json(cls, strings: Sequence[str], data: dict) -> "VocabInfo":
        kind = np.zeros(len(strings), dtype=np.uint8)
        for name, value in (("byte_fallback", BYTE_FALLBACK), ("special", SPECIAL), ("empty", EMPTY)):
            ids = np.asarray(data.get(name, []), dtype=np.int64)
            kind[ids[(ids >= 0) & (ids < len(strings))]] = value
        def known(i: Any) -> int | None:
            return int(i) if i is not None and 0 <= int(i) < len(strings) else None

        return cls(list(strings), kind, known(data.get("eos")), known(data.get("eot")))

    @classmethod
    def guess(cls, strings: Sequence[str], scheme: str | None = None) -> "VocabInfo":
        """For a store written before tokens.json existed: specials and byte pieces read from spellings."""
        kind = np.zeros(len(strings), dtype=np.uint8)
        for i, s in enumerate(strings):
            if s == "" or s.startswith("<fusekit:unused:"):
                kind[i] = EMPTY
            elif re.fullmatch(r"<\|?[^<>\s]{1,40}\|?>", s) and not _SP_BYTE.match(s):
                kind[i] = SPECIAL
        eos = next((i for i, s in enumerate(strings) if s in _EOS_NAMES), None)
        return cls(list(strings), kind, eos, _named_special(strings, kind, _EOT_NAMES))


def vocab_info(tokenizer: Any, size: int | None = None) -> VocabInfo:
    """`VocabInfo` of a `tokenizers.Tokenizer` or a transformers fast tokenizer, for ids 0..size−1
    (default: the tokenizer's length; ids past it — a padded embedding — are EMPTY)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    scheme = token_scheme(tokenizer)
    added = getattr(backend, "get_added_tokens_decoder", lambda: {})()
    special = {t.content for t in added.values() if t.special}
    special |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    n = backend.get_vocab_size(with_added_tokens=True) if size is None else size
    strings: list[str] = []
    kind = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        tok = backend.id_to_token(i)
        if tok is None:
            strings.append("")
            kind[i] = EMPTY
        elif tok in special:
            strings.append(tok)
            kind[i] = SPECIAL
        else:
            strings.append(normalize_token(tok, scheme))
            if scheme is Scheme.SENTENCEPIECE and _SP_BYTE.match(tok):
                kind[i] = BYTE_FALLBACK
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = int(eos) if isinstance(eos, int) and 0 <= eos < n else None
    eot = _template_end_of_turn(tokenizer, kind)
    if eot is None:
        eot = _named_special(strings, kind, _EOT_NAMES)
    return VocabInfo(strings, kind, eos, eot)


def map_specials_by_role(ids: np.ndarray, source: VocabInfo, target: VocabInfo) -> np.ndarray:
    """A source→target id map (int64 [V_s], −1 = nowhere) with the special and empty source ids set by role:
    end of sequence → end of sequence, end of turn → end of turn (each falling back on the target's other
    end token), every other special or padded id → −1. Modifies and returns `ids`."""
    ids[(source.kind == SPECIAL) | (source.kind == EMPTY)] = -1
    for src_end, tgt_end in ((source.eos, target.eos if target.eos is not None else target.eot),
                             (source.eot, target.eot if target.eot is not None else target.eos)):
        if src_end is not None and tgt_end is not None:
            ids[src_end] = tgt_end
    return ids


def _named_special(strings: Sequence[str], kind: np.ndarray, names: Sequence[str]) -> int | None:
    """The first special id spelled as one of `names` (in the order of `names`)."""
    where = {s: i for i, s in enumerate(strings) if kind[i] == SPECIAL and s in names}
    return next((where[name] for name in names if name in where), None)


def _template_end_of_turn(tokenizer: Any, kind: np.ndarray) -> int | None:
    """The special id a model's chat template puts right after an assistant message's content (None
    without a template, or when the template ends turns with plain text)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "FUSEKIT-END-OF-TURN-PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = text[text.index(marker) + len(marker):]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    except Exception:  # a template that needs other roles or variables: fall back on spellings
        return None
    for i in ids[:4]:  # a few text tokens (a space, a newline) may come before the end token
        if 0 <= i < len(kind) and kind[i] == SPECIAL:
            return int(i)
    return None
