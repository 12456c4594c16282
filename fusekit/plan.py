"""`fusekit plan`: what a recipe will cost before any GPU hour is spent.

- Tokens and windows per model: on a small corpus exact (every model's tokenizer over every text, with
  extraction's windowing); on a larger one estimated from texts drawn over the whole corpus by their
  size, as many as it takes to be within 2 % (95 %) (`fusekit.corpus.counts`), so planning takes
  seconds whatever the corpus size. The plan says which (`corpus.estimate`).
- Bytes on disk per store come from running the real stages on a small sample of the corpus (the
  `sample_texts` texts spread evenly over it) in a temporary folder: bytes per token of each store, times the
  token counts, plus the store's fixed files (manifest, vocabulary).
- Compute is counted in FLOPs (2·N per token for a forward pass, 6·N for a training step) and turned
  into time with the extraction speed measured on this machine: the sample's run minus a one-text
  run, so model loading and warm-up are not counted as compute. Training is estimated at 3× a
  forward pass per token. Times are estimates; token counts and bytes are measurements.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from fusekit._units import size_text
from fusekit.models.load import parameter_count
from fusekit.recipe import ModelSpec, Recipe


def _files_bytes(folder: Path) -> tuple[int, int]:
    """(bytes in Parquet shards, bytes in everything else) under a store folder."""
    shards = other = 0
    for p in folder.rglob("*"):
        if p.is_file():
            if p.suffix == ".parquet":
                shards += p.stat().st_size
            else:
                other += p.stat().st_size
    return shards, other


@dataclass
class _TokenCounts:
    """Tokens and windows per text of one record set, under one model's tokenizer and window."""

    tokens: list[int]
    windows: list[int]

    def total(self, texts: list[int] | None = None) -> dict:
        chosen = range(len(self.tokens)) if texts is None else texts
        return {"tokens": sum(self.tokens[i] for i in chosen), "windows": sum(self.windows[i] for i in chosen)}


def _tokenizer_and_window(spec: ModelSpec, max_length: int):
    """The model's tokenizer and extraction's window for it (models are not loaded)."""
    from fusekit.models.identity import model_context
    from fusekit.models.load import load_config, load_tokenizer

    tokenizer = load_tokenizer(spec.model)
    context = model_context(load_config(spec.model, False))
    return tokenizer, (min(max_length, context) if context else max_length)


def _token_counts(tokenizer, window: int, records: list, append_eos: bool) -> _TokenCounts:
    """Every record tokenised, windowed as extraction does (with the end-of-sequence token when it appends it)."""
    from fusekit.corpus import tokenize_record, windows_of

    ids = [tokenize_record(tokenizer, r, append_eos)[0] for r in records]
    return _TokenCounts([len(x) for x in ids], [len(windows_of(x, window)) for x in ids])


def _write_sample(records, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            obj = {"text": r.text} if r.text is not None else {"messages": r.messages}
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _cut(record, chars: int | None):
    """A plain text cut to its first `chars` characters (chat records, and any text when None, whole)."""
    from fusekit.corpus import Record

    if chars is None or record.text is None or len(record.text) <= chars:
        return record
    return Record(text=record.text[:chars], eos=record.eos)


def plan_recipe(recipe: Recipe, sample_texts: int = 8, progress: bool = False, exact_bytes: int | None = None) -> dict:
    """Token counts, bytes on disk per stage and compute per stage for RECIPE, without running it.

    `exact_bytes`: a corpus up to this size is tokenised whole (default `fusekit.corpus.counts.EXACT_BYTES`),
    a larger one is sampled."""
    from fusekit.align.stage import align_store
    from fusekit.corpus import read_records
    from fusekit.corpus.counts import EXACT_BYTES, count_corpus
    from fusekit.extract import extract

    exact_bytes = EXACT_BYTES if exact_bytes is None else exact_bytes

    opts = recipe.extract
    models = [recipe.target, *recipe.sources]
    tokenizers = {spec.name: _tokenizer_and_window(spec, opts.max_length) for spec in models}
    corpus_counts = count_corpus(recipe.corpus.data, recipe.corpus.field, tokenizers, opts.append_eos, exact_bytes=exact_bytes)
    records = corpus_counts.records
    eval_records = {ds.name: list(read_records(ds.data, ds.field)) for ds in recipe.eval.data}
    # Texts spread over the corpus (the draws are): stores' bytes per token vary with the kind of text. A
    # drawn book is cut to a few windows: bytes per token do not depend on a text's length.
    n_sample = min(len(records), max(1, sample_texts))
    cut = 8 * opts.max_length if corpus_counts.method == "sampled" else None
    sample = [_cut(records[(i * len(records)) // n_sample], cut) for i in range(n_sample)]
    plan: dict = {
        "corpus": {
            "texts": round(corpus_counts.texts), "sample_texts": len(sample),
            "estimate": {"method": corpus_counts.method, "how": corpus_counts.describe(), "relative_error_95": corpus_counts.error,
                         "draws": corpus_counts.draws, "clusters": corpus_counts.clusters},
        },
        "models": {},
    }
    counts: dict[str, dict[str | None, _TokenCounts]] = {}

    with tempfile.TemporaryDirectory(prefix="fusekit-plan-") as tmp:
        root = Path(tmp)
        sample_path, small_path = root / "sample.jsonl", root / "one.jsonl"
        _write_sample(sample, sample_path)
        _write_sample(sample[:1], small_path)
        opts_kw = dict(
            top_k=opts.top_k, max_length=opts.max_length, batch_size=opts.batch_size, device=opts.device,
            dtype=opts.dtype, field="text", append_eos=opts.append_eos, progress=progress,
        )
        # The first extraction in a process also pays for imports; keep that out of every timing.
        extract(recipe.target.model, small_path, root / "warm-up", **opts_kw)
        for spec in models:
            tokenizer, window = tokenizers[spec.name]
            counts[spec.name] = {name: _token_counts(tokenizer, window, rs, False) for name, rs in eval_records.items()}
            mini = _token_counts(tokenizer, window, sample, opts.append_eos)
            full = {"tokens": round(corpus_counts.tokens[spec.name]), "windows": round(corpus_counts.windows[spec.name])}
            part, one = mini.total(), mini.tokens[0]
            store = root / "extract" / spec.name
            # Two runs, one text and the whole sample: their difference is compute alone, without the
            # model load and warm-up that both pay.
            started = time.perf_counter()
            extract(spec.model, small_path, root / "extract-one" / spec.name, **opts_kw)
            one_seconds = time.perf_counter() - started
            started = time.perf_counter()
            extract(spec.model, sample_path, store, **opts_kw)
            all_seconds = time.perf_counter() - started
            seconds = max(all_seconds - one_seconds, 1e-3) * part["tokens"] / max(part["tokens"] - one, 1)
            shard_bytes, fixed = _files_bytes(store)
            params = parameter_count(spec.model)
            per_token = shard_bytes / max(part["tokens"], 1)
            plan["models"][spec.name] = {
                **full,
                "params": params,
                "extract_bytes": int(fixed + per_token * full["tokens"]),
                "extract_bytes_per_token": per_token,
                "extract_flops": 2 * params * full["tokens"],
                "extract_seconds": seconds * full["tokens"] / max(part["tokens"], 1),
                "load_seconds": max(one_seconds - seconds * one / max(part["tokens"], 1), 0.0),
                "sample_tokens": part["tokens"],
            }

        aligned = root / "aligned"
        started = time.perf_counter()
        align_store(
            target=root / "extract" / recipe.target.name,
            sources=[root / "extract" / s.name for s in recipe.sources],
            out=aligned,
            workers=recipe.align.workers,
            progress=progress,
        )
        seconds = time.perf_counter() - started
        shard_bytes, fixed = _files_bytes(aligned)
        target = plan["models"][recipe.target.name]
        per_token = shard_bytes / max(target["sample_tokens"], 1)
        plan["align"] = {
            "tokens": target["tokens"],
            "bytes": int(fixed + per_token * target["tokens"]),
            "bytes_per_token": per_token,
            "seconds": seconds * target["tokens"] / max(target["sample_tokens"], 1),
        }

    t = recipe.train
    target = plan["models"][recipe.target.name]
    forward_rate = target["tokens"] / target["extract_seconds"] if target["extract_seconds"] > 0 else 0.0
    train_tokens = math.ceil(target["tokens"] * t.resolved("epochs"))
    per_variant_flops = 6 * target["params"] * train_tokens
    plan["train"] = {
        "variants": [v.name for v in t.variants],
        "tokens_per_variant": train_tokens,
        "flops": per_variant_flops * len(t.variants),
        # A training step costs about three forward passes per token.
        "seconds": 3 * train_tokens * len(t.variants) / forward_rate if forward_rate else None,
        # The final model in fp32 safetensors per variant; checkpoints add optimizer state (2× more).
        "bytes": 4 * target["params"] * len(t.variants),
    }
    eval_flops = 0
    for spec in models:
        per_model = sum(counts[spec.name][ds].total()["tokens"] for ds in eval_records)
        n_runs = 1 + (len(t.variants) if spec.name == recipe.target.name else 0)
        eval_flops += 2 * plan["models"][spec.name]["params"] * per_model * n_runs
    plan["eval"] = {"datasets": list(eval_records), "flops": eval_flops}
    plan["total_bytes"] = sum(m["extract_bytes"] for m in plan["models"].values()) + plan["align"]["bytes"] + plan["train"]["bytes"]
    return plan


def _flops(n: float) -> str:
    return f"{n:.1e}".replace("e+", "e")


def _secs(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _count(n: float) -> str:
    """1234567 → 1.2M: counts that fit a narrow column."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def plan_table(plan: dict) -> Table:
    """The plan as a table that fits 80 columns: compact numbers, no side borders, names may wrap
    (window counts are in the JSON plan)."""
    from rich import box

    corpus = plan["corpus"]
    how = corpus.get("estimate", {})
    if how.get("method") == "sampled":
        texts = f"~{_count(corpus['texts'])} texts, tokens ±{how['relative_error_95']:.1%} from {how['draws']:,} drawn"
    else:
        texts = f"{corpus['texts']:,} texts"
    table = Table(
        title=f"plan · {texts} (bytes and speed measured on {corpus['sample_texts']})",
        title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
    )
    for col in ("stage", "model", "tokens", "params", "disk", "B/tok", "FLOPs", "time"):
        left = col in ("stage", "model")
        if col == "model":
            table.add_column(col, overflow="fold", min_width=12, ratio=1)
        else:
            table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for name, m in plan["models"].items():
        table.add_row(
            "extract", name, _count(m["tokens"]), _count(m["params"]),
            size_text(m["extract_bytes"]), f"{m['extract_bytes_per_token']:.1f}", _flops(m["extract_flops"]),
            _secs(m["extract_seconds"]),
        )
    a = plan["align"]
    table.add_row("align", "→ target", _count(a["tokens"]), "", size_text(a["bytes"]), f"{a['bytes_per_token']:.1f}", "CPU", _secs(a["seconds"]))
    tr = plan["train"]
    table.add_row(
        "train", f"{len(tr['variants'])} variants (tokens each)", _count(tr["tokens_per_variant"]), "", size_text(tr["bytes"]), "",
        _flops(tr["flops"]), _secs(tr["seconds"]),
    )
    table.add_row("eval", ", ".join(plan["eval"]["datasets"]) or "—", "", "", "", "", _flops(plan["eval"]["flops"]), "")
    table.add_row("total", "", "", "", size_text(plan["total_bytes"]), "", "", "")
    return table
