"""Prompts for implicit fusion: chat `messages` without the final assistant turn, an optional reference.

Each JSONL line is `{"messages": [{"role": "user", "content": …}, …], "reference": …, "id": …}`; `id`
defaults to the line's position among the prompts (0-based). Rendering for a model uses its own chat
template with the generation prompt; a tokenizer without a template gets the documented plain format
(`role: content` lines, then `assistant: `), the same plain format fusekit's chat corpora use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusekit.corpus import has_chat_template
from fusekit.implicit.errors import ImplicitError

PLAIN_ASSISTANT = "assistant: "


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]
    reference: Any = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file, in order.

    Raises ImplicitError (naming file and line) for invalid JSON, a record without a `messages` list,
    a conversation without a user turn, one that already ends with an assistant turn, or repeated ids.
    """
    path = Path(path)
    if not path.is_file():
        raise ImplicitError(f"no prompts file at {path}")
    out: list[Prompt] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImplicitError(f"{where} is not valid JSON: {exc.msg}") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ImplicitError(f"{where} has no 'messages' list: each prompt is a chat without its final answer")
            if any(not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m for m in messages):
                raise ImplicitError(f"{where}: every message needs a 'role' and a string 'content'")
            if not any(m["role"] == "user" for m in messages):
                raise ImplicitError(f"{where} has no user turn: add a {{'role': 'user', …}} message")
            if messages[-1]["role"] == "assistant":
                raise ImplicitError(f"{where} ends with an assistant turn: drop it (the sources write that answer)")
            pid = str(obj.get("id", len(out)))
            out.append(Prompt(pid, messages, obj.get("reference")))
    if not out:
        raise ImplicitError(f"{path} holds no prompts")
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ImplicitError(f"{path}: prompt id {dup!r} appears more than once")
    return out


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model reads it before answering (its template, generation prompt on)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + PLAIN_ASSISTANT
