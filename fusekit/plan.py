"""`fusekit plan`: what a recipe will cost before any GPU hour is spent.

- Tokens and windows per model are exact: every model's tokenizer runs over the whole corpus with the
  same windowing as extraction (tokenisers are fast; models are not loaded for this).
- Bytes on disk per store come from running the real stages on a small sample of the corpus (the
  `sample_texts` texts spread evenly over it) in a temporary folder: bytes per token of each store, times the exact
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


def _count_params(model: str) -> int:
    """Parameters from the config alone (a model built on the meta device allocates nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusekit.models.load import load_config

    config = load_config(model, False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())


@dataclass
class _TokenCounts:
    """Tokens and windows per text of one record set, under one model's tokenizer and window."""

    tokens: list[int]
    windows: list[int]

    def total(self, texts: list[int] | None = None) -> dict:
        chosen = range(len(self.tokens)) if texts is None else texts
        return {"tokens": sum(self.tokens[i] for i in chosen), "windows": sum(self.windows[i] for i in chosen)}


def _token_counts(spec: ModelSpec, record_sets: dict[str | None, list], max_length: int, append_eos: bool = True) -> dict[str | None, _TokenCounts]:
    """Every record set tokenised with the model's tokenizer (loaded once), windowed as extraction does
    (the corpus, key None, with the end-of-sequence token when extraction appends it)."""
    from fusekit.corpus import tokenize_record, windows_of
    from fusekit.models.identity import model_context
    from fusekit.models.load import load_config, load_tokenizer

    tokenizer = load_tokenizer(spec.model)
    context = model_context(load_config(spec.model, False))
    window = min(max_length, context) if context else max_length
    out = {}
    for name, records in record_sets.items():
        ids = [tokenize_record(tokenizer, r, append_eos and name is None)[0] for r in records]
        out[name] = _TokenCounts([len(x) for x in ids], [len(windows_of(x, window)) for x in ids])
    return out


def _write_sample(records, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            obj = {"text": r.text} if r.text is not None else {"messages": r.messages}
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


def plan_recipe(recipe: Recipe, sample_texts: int = 8, progress: bool = False) -> dict:
    """Token counts, bytes on disk per stage and compute per stage for RECIPE, without running it."""
    from fusekit.align.stage import align_store
    from fusekit.corpus import read_records
    from fusekit.extract import extract

    records = list(read_records(recipe.corpus.data, recipe.corpus.field))
    eval_records = {ds.name: list(read_records(ds.data, ds.field)) for ds in recipe.eval.data}
    # Texts spread evenly over the corpus: stores' bytes per token vary with the kind of text.
    n_sample = min(len(records), max(1, sample_texts))
    sample_ids = [(i * len(records)) // n_sample for i in range(n_sample)]
    sample = [records[i] for i in sample_ids]
    opts = recipe.extract
    models = [recipe.target, *recipe.sources]
    plan: dict = {"corpus": {"texts": len(records), "sample_texts": len(sample)}, "models": {}}
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
            # Key None is the corpus, so an eval set may have any name.
            counts[spec.name] = _token_counts(spec, {None: records, **eval_records}, opts.max_length, opts.append_eos)
            corpus = counts[spec.name][None]
            full, part = corpus.total(), corpus.total(sample_ids)
            one = corpus.tokens[sample_ids[0]]
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
            params = _count_params(spec.model)
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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


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

    table = Table(
        title=f"plan · {plan['corpus']['texts']:,} texts (bytes and speed measured on {plan['corpus']['sample_texts']})",
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
            _size(m["extract_bytes"]), f"{m['extract_bytes_per_token']:.1f}", _flops(m["extract_flops"]),
            _secs(m["extract_seconds"]),
        )
    a = plan["align"]
    table.add_row("align", "→ target", _count(a["tokens"]), "", _size(a["bytes"]), f"{a['bytes_per_token']:.1f}", "CPU", _secs(a["seconds"]))
    tr = plan["train"]
    table.add_row(
        "train", f"{len(tr['variants'])} variants (tokens each)", _count(tr["tokens_per_variant"]), "", _size(tr["bytes"]), "",
        _flops(tr["flops"]), _secs(tr["seconds"]),
    )
    table.add_row("eval", ", ".join(plan["eval"]["datasets"]) or "—", "", "", "", "", _flops(plan["eval"]["flops"]), "")
    table.add_row("total", "", "", "", _size(plan["total_bytes"]), "", "", "")
    return table
