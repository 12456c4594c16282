"""The demo's domains, built from text every fusekit install has — no downloads.

- code:  the Python standard library's own source files;
- prose: the Python language reference topics shipped in `pydoc_data` (technical English);
- api:   numpy's docstrings (numpydoc-style API reference; numpy is a core dependency).

Each domain is split deterministically into three disjoint parts: `pretrain` (what the domain expert
and the target learn from before fusion), `fusion` (the continual-training corpus every model is
extracted over, as MiniPile is in FuseLLM) and `heldout`. Held-out texts come from documents no other
part has seen, so held-out CE measures generalisation to unseen documents of the domain.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import fusekit.zoo as zoo

DOMAINS = ("code", "prose", "api")


def _numpy_docstrings() -> list[str]:
    import numpy

    docs: list[str] = []
    for path in sorted(Path(numpy.__file__).parent.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return docs


def domain_documents(domain: str) -> list[str]:
    if domain in ("code", "prose"):
        return zoo.stdlib_texts(domain)
    if domain == "api":
        return _numpy_docstrings()
    raise ValueError(f"unknown demo domain {domain!r}; choose from {DOMAINS}")


def _chunks(text: str, size: int) -> list[str]:
    """Long documents (whole source files) cut at line boundaries into pieces of about `size` chars."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


@dataclass(frozen=True)
class Split:
    pretrain: list[str]
    fusion: list[str]
    heldout: list[str]

    def __post_init__(self) -> None:
        for name in ("pretrain", "fusion", "heldout"):
            if not getattr(self, name):
                raise ValueError(f"the {name} part of a demo domain is empty: raise its character budget")


def split_domain(domain: str, pretrain_chars: int, fusion_chars: int, heldout_chars: int, piece: int = 1500) -> Split:
    """Every 8th document is held out; the other documents' pieces alternate between pretrain and
    fusion. Each part is filled up to its character budget, in a fixed order."""
    parts: dict[str, list[str]] = {"pretrain": [], "fusion": [], "heldout": []}
    budget = {"pretrain": pretrain_chars, "fusion": fusion_chars, "heldout": heldout_chars}
    n_pieces = 0
    for d, doc in enumerate(domain_documents(domain)):
        for p in _chunks(doc, piece):
            if not p.strip():
                continue
            if d % 8 == 7:
                side = "heldout"
            else:
                side = "pretrain" if n_pieces % 2 == 0 else "fusion"
                n_pieces += 1
            if budget[side] > 0:
                parts[side].append(p)
                budget[side] -= len(p)
        if all(b <= 0 for b in budget.values()):
            break
    return Split(**parts)


def write_jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
