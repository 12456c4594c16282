"""mergekit's `tokenizer_source` for models that share one vocabulary: which tokenizer the merge ships.

`base` (or none): the base's; a model path: that model's tokenizer files; `union`: the base's, once every
input is checked to have the same vocabulary. Merging different vocabularies (mergekit permutes the
embedding rows for that) is out of scope and refused before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fusekit.merge.errors import MergeError

TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                      "spiece.*", "chat_template.*")  # fmt: skip


def tokenizer_files(folder: Path) -> list[Path]:
    return sorted({p for pat in TOKENIZER_PATTERNS for p in folder.glob(pat) if p.is_file()})


def vocabulary(folder: Path) -> dict[str, int]:
    """token → id of the tokenizer in an HF folder (tokenizer.json if present, else transformers)."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder).get_vocab()
    except (OSError, ValueError) as exc:
        raise MergeError(f"tokenizer_source: cannot read the tokenizer of {folder}: {exc}") from None


def check_tokenizer_source(source: str | None, base: Path, models: list[Path]) -> Path | None:
    """The folder whose tokenizer to copy (None: the base's); MergeError if vocabularies differ."""
    if source is None or source == "base":
        return None
    inputs = [base, *models]
    if source == "union":
        chosen, others = base, models
    else:
        chosen = Path(source).expanduser()
        if not chosen.is_dir():
            raise MergeError(f"tokenizer_source {source}: no model folder there (give base, union or a model's path)")
        others = [p for p in inputs if p.resolve() != chosen.resolve()]
    want = vocabulary(chosen)
    for p in others:
        if vocabulary(p) != want:
            raise MergeError(
                f"tokenizer_source {source}: {p} has another vocabulary than {chosen}; merging different "
                "vocabularies is out of scope: merge models that share one tokenizer"
            )
    return None if chosen.resolve() == base.resolve() else chosen


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Replace the tokenizer files in `out` (copied from the base) with `src`'s."""
    for p in tokenizer_files(out):
        p.unlink()
    copied = []
    for p in tokenizer_files(src):
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied
