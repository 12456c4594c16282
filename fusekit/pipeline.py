"""`fusekit run`: the whole FuseLLM job from one recipe — extract, align, train, evaluate.

Every stage writes a resumable store under the recipe's workdir, so re-running the same recipe skips
what is complete and redoes only what was interrupted. The result is an eval table (and
`results.json`) comparing the untouched target, each source, and every trained variant: mean CE on
the held-out sets and, with `eval: {tasks: …}`, lm-evaluation-harness tasks (lm-eval's results JSON
per model in WORKDIR/eval/). Each trained variant's model card gets both tables.
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

    def task_results(self, model: str) -> Path:
        return self.root / "eval" / f"{model.replace('/', '__').replace(' ', '_')}.json"


@dataclass
class Evaluation:
    ce: list[dict] = field(default_factory=list)  # one per (model, dataset): mean CE, perplexity, nats/char
    tasks: list[dict] = field(default_factory=list)  # one per (model, task, metric): fusekit.eval.harness.task_rows


@dataclass
class RunResult:
    layout: Layout
    eval_rows: list[dict] = field(default_factory=list)  # one per (model, dataset)
    align_report: dict = field(default_factory=dict)
    task_rows: list[dict] = field(default_factory=list)  # one per (model, task, metric)

    def as_json(self) -> dict:
        return {"eval": self.eval_rows, "tasks": self.task_rows, "align_report": self.align_report}


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
        loss=variant.loss if variant.loss is not None else opts.loss,
        jsd_beta=variant.jsd_beta if variant.loss is not None or variant.jsd_beta is not None else opts.jsd_beta,
        loss_on=opts.loss_on,
        gradient_checkpointing=opts.gradient_checkpointing,
        report_to=opts.report_to or None,
        resume=True,
        progress=progress,
    )


def train_all(recipe: Recipe, layout: Layout, progress: bool = True) -> dict[str, Path]:
    return {v.name: train_variant(recipe, v, layout.aligned, layout.trained(v.name), progress) for v in recipe.train.variants}


def check_tasks(recipe: Recipe):
    """The recipe's lm-eval tasks, resolved before any stage spends compute (None without tasks)."""
    options = recipe.eval.task_options()
    if options is None:
        return None
    from fusekit.eval.harness import resolve_tasks

    return resolve_tasks(options)


def evaluate_all(recipe: Recipe, models: dict[str, str], progress: bool = True, layout: Layout | None = None) -> Evaluation:
    """Every model on every eval set and every lm-eval task; each model is loaded once.

    lm-eval's results JSON of each model goes to WORKDIR/eval/NAME.json.
    """
    import torch

    from fusekit.eval.harness import evaluate_tasks, results_json, task_rows
    from fusekit.eval.perplexity import evaluate_loaded
    from fusekit.models.load import load_model, load_tokenizer

    _stage("evaluate")
    layout = layout or Layout(Path(recipe.workdir))
    options = recipe.eval.task_options()
    resolved = check_tasks(recipe)
    device = torch.device(recipe.extract.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    found = Evaluation()
    for name, model in models.items():
        net = load_model(model).to(device).eval()
        tokenizer = load_tokenizer(model)
        for ds in recipe.eval.data:
            result = evaluate_loaded(
                net, tokenizer, ds.data, field=ds.field, max_length=recipe.extract.max_length,
                batch_size=recipe.extract.batch_size, progress=progress, label=f"{name} · {ds.name}",
            )
            found.ce.append({"model": name, "dataset": ds.name, **result})
        if options is not None:
            path = layout.task_results(name)
            identity = _task_identity(model, options, resolved)
            stamp = path.with_suffix(".identity.json")
            if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == identity:
                results = json.loads(path.read_text())  # evaluated before: same weights, tasks and options
            else:
                if progress:
                    console.print(f"lm-eval · {name} · {', '.join(resolved.names)}", highlight=False)
                results = evaluate_tasks(net, tokenizer, options, resolved)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(results_json(results) + "\n")
                stamp.write_text(json.dumps(identity, indent=2) + "\n")
            found.tasks.extend(task_rows(name, results))
        del net
    return found


def _task_identity(model: str, options, resolved) -> dict:
    """What a model's lm-eval results depend on: its weight files (name, size, mtime), the task options,
    and the bytes of every local task file (YAML and data) — so a re-run reuses them, and only them."""
    import hashlib

    ref = Path(model)
    weights = sorted(ref.glob("*.safetensors")) + sorted(ref.glob("*.bin")) if ref.is_dir() else [ref] if ref.is_file() else []
    digest = hashlib.sha256()
    for folder in options.include_path:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl"):
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return {
        "model": str(model),
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        "options": options.identity(),
        "tasks": resolved.names,
        "task_files_sha256": digest.hexdigest(),
    }


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


def ce_markdown(rows: list[dict]) -> str:
    """Mean CE (nats/token) per model and dataset as Markdown, nats/char in brackets where known."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["dataset"]] = r
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for model, cells in by_model.items():
        texts = []
        for d in datasets:
            r = cells.get(d)
            npc = r.get("nats_per_char") if r else None
            texts.append("—" if r is None else f"{r['mean_ce']:.4f}" + (f" ({npc:.4f})" if npc is not None else ""))
        lines.append(f"| {model} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def card_evaluation(trained: dict[str, Path], evaluation: Evaluation) -> None:
    """Each trained variant's model card gets the eval tables (every model, for comparison) and its own
    figures as the hub's model-index."""
    from fusekit.eval.harness import markdown_table
    from fusekit.train.model_card import add_evaluation

    tables = ""
    if evaluation.ce:
        tables += "Held-out mean CE, nats/token (nats/character):\n\n" + ce_markdown(evaluation.ce) + "\n"
    if evaluation.tasks:
        tables += "lm-evaluation-harness tasks (value ± standard error):\n\n" + markdown_table(evaluation.tasks)
    for name, folder in trained.items():
        mine = [
            {"dataset": r["dataset"], "metric": "perplexity", "value": r["perplexity"], "name": f"held-out perplexity ({r['dataset']})"}
            for r in evaluation.ce if r["model"] == name
        ] + [
            {"dataset": r["task"], "metric": r["metric"], "value": r["value"], "name": f"{r['task']} {r['metric']}"}
            for r in evaluation.tasks if r["model"] == name
        ]
        if mine:
            add_evaluation(folder, name, tables, mine)


def run_recipe(recipe: Recipe, progress: bool = True) -> RunResult:
    """Run (or resume) every stage of `recipe`; returns the eval rows and the alignment report."""
    layout = Layout(Path(recipe.workdir))
    layout.root.mkdir(parents=True, exist_ok=True)
    check_tasks(recipe)  # unknown tasks, missing task files or a missing lm-eval fail before any stage runs
    extract_all(recipe, layout, progress)
    report = align_all(recipe, layout, progress)
    trained = train_all(recipe, layout, progress)
    models = {f"{recipe.target.name} (before)": recipe.target.model}
    models.update({s.name: s.model for s in recipe.sources})
    models.update({name: str(path) for name, path in trained.items()})
    evaluation = evaluate_all(recipe, models, progress, layout)
    card_evaluation(trained, evaluation)
    result = RunResult(layout=layout, eval_rows=evaluation.ce, align_report=report, task_rows=evaluation.tasks)
    layout.results.write_text(json.dumps(result.as_json(), indent=2))
    return result
