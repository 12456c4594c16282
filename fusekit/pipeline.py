"""`fusekit run`: the whole FuseLLM job from one recipe — extract, align, train, evaluate.

Every stage writes a resumable store under the recipe's workdir, so re-running the same recipe skips
what is complete and redoes only what was interrupted. The result is an eval table (and
`results.json`) comparing the untouched target, each source, and every trained variant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fusekit.recipe import Recipe

console = Console(stderr=True)


@dataclass
class Layout:
    """Where each stage of a recipe writes."""

    root: Path

    def extract(self, name: str) -> Path:
        return self.root / "extract" / name

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    def trained(self, variant: str) -> Path:
        return self.root / "train" / variant

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def prepared(self) -> Path:
        return self.root / "corpus-pieces.jsonl"


@dataclass
class RunResult:
    layout: Layout
    eval_rows: list[dict] = field(default_factory=list)  # one per (model, dataset)
    align_report: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"eval": self.eval_rows, "align_report": self.align_report}


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def extract_all(recipe: Recipe, layout: Layout, progress: bool = True) -> None:
    from fusekit.extract import extract

    opts = recipe.extract
    data, field = recipe.corpus.data, recipe.corpus.field
    if opts.prepare:
        from fusekit.prepare import prepare_corpus
        from fusekit.models.load import load_tokenizer

        if not layout.prepared.is_file():
            _stage("prepare · pieces every model sees whole")
            models = [recipe.target, *recipe.sources]
            stats = prepare_corpus(data, layout.prepared, [load_tokenizer(m.model) for m in models], opts.max_length, field)
            console.print(f"{stats.pieces:,} pieces from {stats.texts:,} texts ({stats.cut:,} cut)")
        data, field = str(layout.prepared), field
    for spec in [recipe.target, *recipe.sources]:
        _stage(f"extract · {spec.name}")
        extract(
            spec.model,
            data,
            layout.extract(spec.name),
            top_k=opts.top_k,
            max_length=opts.max_length,
            batch_size=opts.batch_size,
            device=opts.device,
            dtype=opts.dtype,
            field=field,
            append_eos=opts.append_eos,
            progress=progress,
        )


def align_to(recipe: Recipe, layout: Layout, sources: list[str], out: Path, progress: bool = True) -> dict:
    """Align the named sources' stores onto the target's; returns the alignment report."""
    from fusekit.align.stage import align_store

    _stage(f"align · {' + '.join(sources)} → {recipe.target.name}")
    specs = {s.name: s for s in recipe.sources}
    return align_store(
        target=layout.extract(recipe.target.name),
        sources=[layout.extract(name) for name in sources],
        out=out,
        workers=recipe.align.workers,
        method=[(specs[n].align_method if n in specs and specs[n].align_method else recipe.align.method) for n in sources],
        progress=progress,
    )


def align_all(recipe: Recipe, layout: Layout, progress: bool = True) -> dict:
    return align_to(recipe, layout, [s.name for s in recipe.sources], layout.aligned, progress)


def train_variant(recipe: Recipe, variant, aligned: Path, out: Path, progress: bool = True) -> Path:
    from fusekit.train import train

    opts = recipe.train
    _stage(f"train · {variant.name}")
    return train(
        model=recipe.target.model,
        aligned=aligned,
        out=out,
        fusion=variant.fusion,
        granularity=variant.granularity,
        lam=variant.lam,
        lr=opts.lr,
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        max_length=opts.max_length,
        warmup_ratio=opts.warmup_ratio,
        weight_decay=opts.weight_decay,
        clip=opts.clip,
        dtype=opts.dtype,
        seed=opts.seed,
        max_steps=opts.max_steps,
        preset=opts.preset,
        lam_schedule=opts.lam_schedule,
        lam_end=opts.lam_end,
        teacher_temperature=opts.teacher_temperature,
        loss_on=opts.loss_on,
        gradient_checkpointing=opts.gradient_checkpointing,
        resume=True,
        progress=progress,
    )


def train_all(recipe: Recipe, layout: Layout, progress: bool = True) -> dict[str, Path]:
    return {v.name: train_variant(recipe, v, layout.aligned, layout.trained(v.name), progress) for v in recipe.train.variants}


def evaluate_all(recipe: Recipe, models: dict[str, str], progress: bool = True) -> list[dict]:
    """Every model on every eval set; each model is loaded once."""
    import torch

    from fusekit.eval.perplexity import evaluate_loaded
    from fusekit.models.load import load_model, load_tokenizer

    _stage("evaluate")
    device = torch.device(recipe.extract.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict] = []
    for name, model in models.items():
        net = load_model(model).to(device).eval()
        tokenizer = load_tokenizer(model)
        for ds in recipe.eval:
            result = evaluate_loaded(
                net, tokenizer, ds.data, field=ds.field, max_length=recipe.extract.max_length,
                batch_size=recipe.extract.batch_size, progress=progress, label=f"{name} · {ds.name}",
            )
            rows.append({"model": name, "dataset": ds.name, **result})
        del net
    return rows


def eval_table(rows: list[dict]):
    """Mean CE (nats/token) per model (rows) and dataset (columns), with nats/char where known."""
    from rich.table import Table

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    table = Table(title="held-out mean CE, nats/token (nats/char)", title_justify="left")
    table.add_column("model")
    for d in datasets:
        table.add_column(d, justify="right")
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["dataset"]] = r
    for model, cells in by_model.items():
        texts = []
        for d in datasets:
            r = cells.get(d)
            if r is None:
                texts.append("—")
            else:
                npc = r.get("nats_per_char")
                texts.append(f"{r['mean_ce']:.4f}" + (f" ({npc:.4f})" if npc is not None else ""))
        table.add_row(model, *texts)
    return table


def run_recipe(recipe: Recipe, progress: bool = True) -> RunResult:
    """Run (or resume) every stage of `recipe`; returns the eval rows and the alignment report."""
    layout = Layout(Path(recipe.workdir))
    layout.root.mkdir(parents=True, exist_ok=True)
    extract_all(recipe, layout, progress)
    report = align_all(recipe, layout, progress)
    trained = train_all(recipe, layout, progress)
    models = {f"{recipe.target.name} (before)": recipe.target.model}
    models.update({s.name: s.model for s in recipe.sources})
    models.update({name: str(path) for name, path in trained.items()})
    result = RunResult(layout=layout, eval_rows=evaluate_all(recipe, models, progress), align_report=report)
    layout.results.write_text(json.dumps(result.as_json(), indent=2))
    return result
