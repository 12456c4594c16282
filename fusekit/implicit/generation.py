"""What a sampling backend returns, and where its answers end: shared by the `transformers` backend
(sample.py) and the vLLM backend (vllm_backend.py), so both write the same rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    """One answer: its text (the tokens decoded without special tokens), its token ids (no EOS), why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop": the model ended with EOS; "length": max_new_tokens ran out


def eos_ids(tok, generation_config) -> set[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation-config EOS ids
    (chat models such as Llama-3 end a turn with a token other than the tokenizer's EOS)."""
    ids: set[int] = set()
    for value in (tok.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
