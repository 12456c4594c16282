"""A record as a model sees it: chat rendered with the tokenizer's template, tokens with their offsets,
and the windows extraction cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusekit.corpus.records import Record


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer renders chats through a template of its own (else chats are read as plain
    `role: content` lines)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns."""
    template = has_chat_template(tokenizer)

    def render(msgs: list[dict]) -> str:
        if template:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs)  # templateless tokenizers

    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            before = len(render(messages[:i])) if i else 0
            spans.append((before, len(render(messages[: i + 1]))))
    return render(messages), spans


@dataclass
class TokenizedText:
    """A record as the model sees it: the text, its tokens and where each token starts in it."""

    text: str  # the plain text, or the chat rendered by the tokenizer's template
    input_ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n]: character (code point) offset where each token starts
    mask: np.ndarray | None  # bool [n] for chat records: the assistant tokens


def tokenize_with_offsets(tokenizer, record: Record, append_eos: bool = False) -> TokenizedText:
    """Tokenise the whole text once without special tokens, so offsets are plain text positions.

    `append_eos`: a plain text (not a chat record, whose template ends its turns itself) gets the
    tokenizer's end-of-sequence token after its last character (offset len(text)), as the FuseLLM
    reference does, so a model learns where documents end. Needs a fast tokenizer (offsets come from its
    Rust backend).
    """
    if record.text is not None:
        text, spans = record.text, None
    else:
        text, spans = _render_chat(tokenizer, record.messages or [])
    # verbose=False: whole texts are tokenised on purpose (windows are cut afterwards), so no "longer than the
    # maximum sequence length" warning.
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    offsets = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
    mask = None
    if spans is not None:
        mask = np.zeros(len(offsets), dtype=bool)
        for lo, hi in spans:
            mask |= (offsets >= lo) & (offsets < hi)
    ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and record.text is not None and record.eos and isinstance(eos, int):
        ids = np.append(ids, np.int64(eos))
        offsets = np.append(offsets, np.int64(len(text)))
    return TokenizedText(text, ids, offsets, mask)


def tokenize_record(tokenizer, record: Record, append_eos: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids (no special tokens added: windows as extraction cuts them; the end-of-sequence token
    after a plain text with `append_eos`) and, for chat records, a mask of the assistant tokens."""
    if record.text is not None and not append_eos:
        return np.asarray(tokenizer(record.text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64), None
    tokenized = tokenize_with_offsets(tokenizer, record, append_eos)
    return tokenized.input_ids, tokenized.mask


def windows_of(ids: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """Consecutive non-overlapping windows of at most max_length tokens."""
    return [(s, min(len(ids), s + max_length)) for s in range(0, len(ids), max_length)]
