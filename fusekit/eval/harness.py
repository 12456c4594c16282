"""Downstream tasks through EleutherAI's lm-evaluation-harness (`fusekit eval --tasks`).

fusekit loads the model (a folder, a `.gguf` file or a hub id, `fusekit.models.load`) and hands
lm-eval the loaded model and tokenizer objects (`HFLM(pretrained=<model>, tokenizer=<tokenizer>)`),
so every model fusekit can load is evaluated the same way, and every number is lm-eval's own: its
task configs, prompts, metrics, aggregation and standard errors. Nothing of the harness is
re-implemented here; this module resolves task names, checks local task files before any model
runs, calls `lm_eval.simple_evaluate` and turns its results into table rows.

A local task is a YAML file in an `--include-path` folder whose dataset is a local JSON/JSONL file:

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/items.jsonl}}
    test_split: test
    output_type: multiple_choice      # or generate_until, loglikelihood, …
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

EXTRA = "pip install 'fusekit[eval]'"
# `datasets` builders whose data_files are local files (a task YAML's `dataset_path`).
_FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class TaskEvalError(ValueError):
    """A task evaluation that cannot run: lm-eval missing, an unknown task, a missing task file."""


@dataclass(frozen=True)
class TaskOptions:
    """lm-eval's options that matter for a run (`fusekit eval --tasks`, a recipe's `eval: {tasks: …}`).

    `tasks`: task, group or tag names (lm-eval's or from `include_path`; glob patterns as lm-eval
    takes them). `limit`: examples per task (a fraction < 1 is a share). `batch_size`: requests per
    forward pass. `apply_chat_template`: wrap prompts in the tokenizer's chat template (few-shot
    examples as turns, as lm-eval's CLI does).
    """

    tasks: tuple[str, ...]
    include_path: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    apply_chat_template: bool = False
    bootstrap_iters: int = 100_000  # lm-eval's default: standard errors of non-mean metrics

    def identity(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def require_lm_eval() -> None:
    """Raise TaskEvalError naming the extra to install when lm-eval is not importable."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskEvalError(f"--tasks needs lm-evaluation-harness (lm-eval), which is not installed: {EXTRA}") from None


def split_names(values: Sequence[str]) -> tuple[str, ...]:
    """`--tasks a,b --tasks c` → (a, b, c), in order, without repeats or blanks."""
    return tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


@dataclass
class ResolvedTasks:
    """Task names as lm-eval will load them, and the TaskManager that knows them."""

    names: list[str]
    manager: Any = field(repr=False)


def resolve_tasks(options: TaskOptions) -> ResolvedTasks:
    """Check every task name and local task file before any model is loaded.

    Names are looked up in the include paths first (lm-eval's own index of those folders only, fast),
    then in lm-eval's full task list (≈15k YAML files, seconds). Raises TaskEvalError for an include
    path that is not a folder, an unknown name (with lm-eval's close names) or a local task whose data
    file is missing (naming the file and the YAML that points at it).
    """
    require_lm_eval()
    if not options.tasks:
        raise TaskEvalError("no task given: --tasks NAME[,NAME…]")
    for p in options.include_path:
        if not Path(p).is_dir():
            raise TaskEvalError(f"--include-path {p}: no such folder (give the folder that holds the task YAML files)")
    manager = _task_manager(options.include_path, with_defaults=False) if options.include_path else None
    if manager is None or any(not manager.match_tasks([t]) for t in options.tasks):
        manager = _full_task_manager(options.include_path)
    names: list[str] = []
    for task in options.tasks:
        matched = manager.match_tasks([task])
        if not matched:
            raise TaskEvalError(_unknown_task_message(task, manager.all_tasks, options.include_path))
        names.extend(m for m in matched if m not in names)
    for name in names:
        _check_local_files(manager, name)
    return ResolvedTasks(names, manager)


def _task_manager(include_path: tuple[str, ...], with_defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_path] or None
    return TaskManager(include_path=paths, include_defaults=with_defaults)


@lru_cache(maxsize=2)
def _full_task_manager(include_path: tuple[str, ...]):
    """lm-eval's whole task list (+ the include paths): built once per process, it reads ≈15k files."""
    return _task_manager(include_path, with_defaults=True)


def _unknown_task_message(task: str, known: Sequence[str], include_path: Sequence[str]) -> str:
    close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
    where = f" (nor in {', '.join(include_path)})" if include_path else ""
    if close:
        return f"unknown task {task!r}{where}; close names in lm-eval's task list: {', '.join(close)}"
    return f"unknown task {task!r}{where}; `lm-eval ls tasks` lists lm-eval's tasks"


def _check_local_files(manager, name: str, seen: set[str] | None = None) -> None:
    """A task (or every task of a group) whose dataset is a local file must find that file."""
    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None or not isinstance(entry.cfg, dict):
        return
    cfg = entry.cfg
    members = cfg.get("task") if "group" in cfg else None
    if isinstance(members, list):
        for member in members:
            if isinstance(member, str):
                _check_local_files(manager, member, seen)
        return
    source = str(cfg.get("dataset_path") or "")
    where = f"(dataset_kwargs.data_files of {entry.yaml_path})"
    if source in _FILE_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        for path in _file_list(files):
            if not any(ch in path for ch in "*?[") and not Path(path).expanduser().exists():
                raise TaskEvalError(f"task {name}: its data file {path} does not exist {where}")
    elif source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise TaskEvalError(f"task {name}: its dataset_path {source} does not exist (in {entry.yaml_path})")


def _file_list(files: Any) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [p for v in files.values() for p in _file_list(v)]
    if isinstance(files, (list, tuple)):
        return [p for v in files for p in _file_list(v)]
    return []


def evaluate_tasks(net, tokenizer, options: TaskOptions, resolved: ResolvedTasks | None = None) -> dict:
    """lm-eval's results dict (`results`, `n-samples`, `configs`, `versions`, …) for a loaded model.

    `net` is a transformers causal LM already on its device (lm-eval runs it where it is);
    `tokenizer` its tokenizer. Seeds are lm-eval's defaults (as its CLI), so figures equal the CLI's.
    """
    resolved = resolved or resolve_tasks(options)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    net.eval()
    lm = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=options.batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=resolved.names,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        task_manager=resolved.manager,
        apply_chat_template=options.apply_chat_template,
        fewshot_as_multiturn=options.apply_chat_template,
        bootstrap_iters=options.bootstrap_iters,
        log_samples=False,
    )
    if results is None:  # not rank 0 of a launcher: nothing to report here
        return {}
    return results


def results_json(results: dict) -> str:
    """lm-eval's results as its own CLI writes them (numpy values and sets made JSON-safe)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def task_rows(model: str, results: dict) -> list[dict]:
    """One row per (task, metric, filter) that a table shows, from lm-eval's results.

    A group that lm-eval aggregates stands for its tasks; other tasks show as they are. Each row:
    model, task, metric, filter, value, stderr (None where lm-eval gives none), samples (n evaluated),
    higher_is_better.
    """
    scores: dict[str, dict] = results.get("results", {})
    aggregated = set(results.get("groups", {}))
    hidden = {t for g, members in results.get("group_subtasks", {}).items() if g in aggregated for t in members}
    rows = []
    for task, values in scores.items():
        if task in hidden:
            continue
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "samples": samples,
                    "higher_is_better": better.get(metric),
                }
            )
    return rows


def column_of(row: dict) -> str:
    """A table column's name: the task and its metric (and the filter, where it is not lm-eval's `none`)."""
    name = f"{row['task']} {row['metric']}"
    return name if row["filter"] == "none" else f"{name} ({row['filter']})"


def task_table(rows: list[dict], title: str = "lm-eval tasks (value ± stderr)"):
    """A rich Table: models as rows, task metrics as columns, the best value of each column in bold."""
    from rich.table import Table

    columns = list(dict.fromkeys(column_of(r) for r in rows))
    cells: dict[str, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault(r["model"], {})[column_of(r)] = r
    best: dict[str, float] = {}
    for col in columns:
        values = [(c[col]["value"], c[col]["higher_is_better"]) for c in cells.values() if col in c]
        if values:
            best[col] = (max if values[0][1] is not False else min)(v for v, _ in values)
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for col in columns:
        table.add_column(col, justify="right")
    for model, by_col in cells.items():
        texts = []
        for col in columns:
            r = by_col.get(col)
            if r is None:
                texts.append("—")
                continue
            text = f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r["stderr"] is not None else "")
            texts.append(f"[bold]{text}[/]" if len(cells) > 1 and r["value"] == best.get(col) else text)
        table.add_row(model, *texts)
    return table


def markdown_table(rows: list[dict]) -> str:
    """The same table as Markdown (model cards, README), values with their standard error."""
    columns = list(dict.fromkeys(column_of(r) for r in rows))
    cells: dict[str, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault(r["model"], {})[column_of(r)] = r
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, by_col in cells.items():
        texts = []
        for col in columns:
            r = by_col.get(col)
            texts.append("—" if r is None else f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""))
        lines.append(f"| {model} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"
