"""Stage 2 (score): a reward per response, from a function (a verifier) or a reward model.

Functions have the signature fn(messages, response, reference) -> float. Built-in verifiers:
`exact_match` (the stripped response equals str(reference)) and `numeric` (the last number in the
response equals the reference number). A user function is named "pkg.module:fn"; the config's folder
is searched first. A call that raises or returns a non-finite value gives a null reward: the response
is skipped by later stages, and the failures are counted (with the first error) in the stage record.

A reward model (`reward: {model: PATH}`) is a sequence-classification model with its own tokenizer:
the conversation plus the response is rendered with *its* chat template and the first logit is the
reward (the convention of Skywork/ArmoRM-style reward models, which FuseChat-3.0 uses).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fusekit.corpus import has_chat_template
from fusekit.implicit.errors import ImplicitError

RewardFn = Callable[[list, str, Any], float]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def exact_match(messages: list, response: str, reference: Any) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals str(reference); else 0.0."""
    if reference is None:
        raise ValueError("exact_match needs a reference")
    return float(response.strip() == str(reference).strip())


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas in 1,234 ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numeric(messages: list, response: str, reference: Any) -> float:
    """1.0 when the last number in the response equals the reference (a number or numeric string)."""
    if reference is None:
        raise ValueError("numeric needs a reference")
    want = float(reference) if not isinstance(reference, str) else last_number(reference)
    if want is None:
        raise ValueError(f"reference {reference!r} holds no number")
    got = last_number(response)
    return float(got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "numeric": numeric}


def load_function(spec: str, search: Path | None = None) -> RewardFn:
    """A built-in verifier name, or "pkg.module:fn" importable (from `search` first, then sys.path)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ImplicitError(f"reward.function {spec!r}: give a built-in ({', '.join(BUILTIN)}) or 'pkg.module:fn'")
    added = search is not None and str(search) not in sys.path
    if added:
        sys.path.insert(0, str(search))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImplicitError(f"reward.function {spec!r}: cannot import {module_name}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(search))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImplicitError(f"reward.function {spec!r}: {module_name} has no function {attr!r}")
    return fn


@dataclass
class ScoreReport:
    """What scoring skipped: calls that raised or returned NaN/inf, counted, with the first few errors."""

    scored: int = 0
    failed: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, where: str, why: str) -> None:
        self.failed += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {why}")

    def as_dict(self) -> dict:
        return {"scored": self.scored, "failed": self.failed, "examples": self.examples}


def score_with_function(
    fn: RewardFn, rows: Sequence[tuple[str, list, str, Any]], report: ScoreReport, name: str = "reward function"
) -> list[float | None]:
    """fn over (where, messages, response, reference) rows; None (and counted) where it fails."""
    out: list[float | None] = []
    for where, messages, response, reference in rows:
        try:
            value = float(fn(messages, response, reference))
        except Exception as exc:  # a user's verifier may raise anything: count it, keep going
            report.fail(where, f"{name} raised {type(exc).__name__}: {exc}")
            out.append(None)
            continue
        if not math.isfinite(value):
            report.fail(where, f"{name} returned {value}")
            out.append(None)
        else:
            report.scored += 1
            out.append(value)
    return out


class RewardModel:
    """A sequence-classification reward model with its own tokenizer and chat template."""

    def __init__(self, model: str | Path, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from fusekit.models.device import resolve_device
        from fusekit.models.load import load_tokenizer, quiet_transformers, split_model_ref

        self.device = resolve_device(device)
        where, extra = split_model_ref(model)
        try:
            with quiet_transformers():
                self.net = AutoModelForSequenceClassification.from_pretrained(where, dtype=torch.float32, **extra)
        except (OSError, ValueError) as exc:
            raise ImplicitError(f"cannot load a reward model from {model}: {str(exc).splitlines()[0]}") from None
        self.net.to(self.device).eval()
        self.tokenizer = load_tokenizer(model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.net.config.pad_token_id = self.pad_id

    def render(self, messages: list, response: str) -> str:
        convo = [*messages, {"role": "assistant", "content": response}]
        if has_chat_template(self.tokenizer):
            return self.tokenizer.apply_chat_template(convo, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in convo)

    def score(self, pairs: Sequence[tuple[list, str]], batch_size: int = 8) -> list[float]:
        """Rewards (the first logit) for (messages, response) pairs; right-padded batches."""
        import torch

        out: list[float] = []
        for i in range(0, len(pairs), batch_size):
            texts = [self.render(m, r) for m, r in pairs[i : i + batch_size]]
            enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, : len(e)] = torch.tensor(e)
                mask[r, : len(e)] = 1
            with torch.inference_mode():
                logits = self.net(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out
