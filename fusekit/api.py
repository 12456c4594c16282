"""fusekit's public Python API: one plain function per stage, each returning a `StageResult`.

The rule: a stage's package keeps its name (`fusekit.extract`, `fusekit.train`, `fusekit.merge`, …) and
the function users call is `fusekit.run_<stage>` — so no package and function share a name, and
`inspect.signature`, IDEs, type checkers and pickle see ordinary functions. Every `run_*` returns a
`StageResult`: the stage's output path (`out`, None for stages that only measure) and its report (a
JSON-ready dict), plus the stage's own rich result in `detail` where it has one (a MergeResult, the
recipe's RunResult). A StageResult is `os.PathLike`, so stages chain:

    target = fusekit.run_extract("target-model", "corpus.jsonl", "x/target")
    source = fusekit.run_extract("source-model", "corpus.jsonl", "x/source")
    aligned = fusekit.run_align(target, [source], "x/aligned")
    trained = fusekit.run_train("target-model", aligned, "x/trained", lam=0.9)
    fusekit.run_eval(trained, "heldout.txt").report["mean_ce"]

Model and tokenizer arguments take a path (a folder, a .gguf file, a hub id) and, where the stage runs
in this process only, a loaded object: `run_eval` takes a transformers model (with `tokenizer=`) and
`fusekit.transfer` takes tokenizer objects or paths. `run_extract` and `run_train` take paths: they
record the model's fingerprint so that a resumed run refuses other weights, and every Ray actor or
torchrun rank loads the model itself (rank 0 only, under FSDP2).

The spellings of the previous release (`fusekit.extract(...)`, `fusekit.train(...)`, `fusekit.merge(...)`,
`fusekit.align_store`, `fusekit.evaluate`, `fusekit.implicit_fusion`) still work, with their old return
values, and warn (DeprecationWarning); they go in the next release.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "StageResult",
    "run_align",
    "run_demo",
    "run_distill",
    "run_eval",
    "run_extract",
    "run_fusechat",
    "run_implicit",
    "run_merge",
    "run_plan",
    "run_recipe",
    "run_train",
]


@dataclass(frozen=True)
class StageResult:
    """What a stage did: `stage` (its name), `out` (the folder it wrote; None for run_eval/run_plan),
    `report` (a JSON-ready dict: the stage's figures), `detail` (the stage's own result object, if any)."""

    stage: str
    out: Path | None
    report: dict = field(default_factory=dict)
    detail: Any = field(default=None, repr=False, compare=False)

    def __fspath__(self) -> str:
        if self.out is None:
            raise TypeError(f"the {self.stage} stage wrote no folder: its result is not a path")
        return os.fspath(self.out)

    def __getattr__(self, name: str) -> Any:
        # One release of grace for code written against the recipe's RunResult (`.eval_rows`, `.layout`, …).
        detail = self.__dict__.get("detail")
        if detail is not None and not name.startswith("_") and hasattr(detail, name):
            warnings.warn(
                f"StageResult.{name} is deprecated: use .report or .detail.{name}", DeprecationWarning, stacklevel=2
            )
            return getattr(detail, name)
        raise AttributeError(f"StageResult has no attribute {name!r}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run_extract(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    top_k: int = 10,
    max_length: int = 2048,
    batch_size: int = 8,
    shard: str | tuple[int, int] | None = None,
    num_shards: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    field: str = "text",
    trust_remote_code: bool = False,
    append_eos: bool = True,
    progress: bool = True,
    pack: bool = True,
    ray: str | None = None,
    ray_workers: int | None = None,
) -> StageResult:
    """Stage 1: run MODEL over DATA and store its top-k next-token distributions and per-token CE (nats).

    See `fusekit.extract.run.extract` for every option (sharding, Ray, packing). `report` is the store's
    manifest settings (model, k, n_texts, num_shards, codec, fingerprints). Raises ExtractError,
    CorpusError, ModelLoadError, StoreError with a one-line reason.
    """
    from fusekit.extract.run import extract
    from fusekit.store.shards import MANIFEST

    path = extract(
        model, data, out, top_k=top_k, max_length=max_length, batch_size=batch_size, shard=shard,
        num_shards=num_shards, device=device, dtype=dtype, field=field, trust_remote_code=trust_remote_code,
        append_eos=append_eos, progress=progress, pack=pack, ray=ray, ray_workers=ray_workers,
    )
    manifest = _read_json(Path(path) / MANIFEST)
    return StageResult("extract", Path(path), manifest.get("settings", manifest))


def run_align(
    target: str | Path | Any,
    sources: Sequence[str | Path | Any] | str | Path,
    out: str | Path,
    *,
    method: str | Sequence[str] | None = None,
    shard: str | None = None,
    num_shards: int | None = None,
    workers: int | None = None,
    vocab_map_cache: str | Path | None = None,
    ray: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Stage 2: align every source store's top-k onto the target store's tokens; write the aligned store OUT.

    `target`, `sources`: extraction stores (folders, StageResults of run_extract, or ExtractStore objects)
    of one corpus. `method`: "bytespan" (default), "fusellm" or "fusechat", one for all or one per
    source. `report`: per source, the share of target positions reached, exact matches, vocabulary-map
    statistics (docs/ALIGN.md). See `fusekit.align.stage.align_store`. Raises StoreError.
    """
    from fusekit.align.stage import align_store

    refs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    report = align_store(
        _path_or_object(target), [_path_or_object(s) for s in refs], out, shard=shard, num_shards=num_shards,
        workers=workers, vocab_map_cache=vocab_map_cache, ray=ray, method=method, progress=progress,
    )
    return StageResult("align", Path(out), _jsonable(report))


def _path_or_object(ref: Any) -> Any:
    return Path(os.fspath(ref)) if isinstance(ref, os.PathLike) else ref


def run_train(
    model: str | Path,
    aligned: str | Path,
    out: str | Path,
    *,
    config: Any = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    **options: Any,
) -> StageResult:
    """Stage 3: train MODEL on λ·CLM + (1−λ)·fusion over the aligned store; the trained model goes to OUT.

    `options` are TrainConfig fields (`lam`, `fusion`, `lr`, `fsdp`, `gradient_checkpointing`, …; an
    unknown name raises TrainConfigError naming it); they override `config` (a TrainConfig, a mapping
    or a YAML/TOML file). `report` is OUT/fusekit_train.json (options, steps, final metrics; on rank 0).
    See `fusekit.train.loop.train`. Raises TrainConfigError, TrainDataError, TrainError.
    """
    from fusekit.train.checkpoint import DONE_FILE
    from fusekit.train.loop import train

    path = train(model, _path_or_object(aligned), out, config=config, resume=resume, progress=progress, device=device, **options)
    return StageResult("train", Path(path), _read_json(Path(path) / DONE_FILE))


def run_distill(
    model: str | Path,
    teachers: Sequence[str | Path],
    data: str | Path | Sequence[str],
    out: str | Path,
    *,
    top_k: int = 10,
    on_policy_ratio: float = 0.0,
    config: Any = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    **options: Any,
) -> StageResult:
    """Stages 1–3 online: train MODEL on λ·CLM + (1−λ)·fusion with TEACHERS run beside it over DATA (a corpus
    path or a list of texts), no extraction store; the trained model goes to OUT.

    `on_policy_ratio`: share of micro-batches trained on the target's own samples (GKD). `options`: the
    TrainConfig fields of `run_train`, and `fusekit.train.online.distill`'s own (`field`, `prompt_share`,
    `memory_available`, …). `report` is OUT/fusekit_train.json. Raises TeacherMemoryError (a teacher that
    does not fit, before any step), TrainConfigError, TrainDataError, TrainError.
    """
    from fusekit.train.checkpoint import DONE_FILE
    from fusekit.train.online import distill

    path = distill(model, [os.fspath(t) for t in teachers], data if isinstance(data, (list, tuple)) else _path_or_object(data), out,
                   top_k=top_k, on_policy_ratio=on_policy_ratio, config=config, resume=resume, progress=progress,
                   device=device, **options)
    return StageResult("distill", Path(path), _read_json(Path(path) / DONE_FILE))


def run_eval(
    model: str | Path | Any,
    data: str | Path | Sequence[str],
    *,
    tokenizer: str | Path | Any = None,
    field: str = "text",
    max_length: int = 2048,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Mean CE (nats per predicted token) and perplexity of MODEL on DATA; `report` holds mean_ce,
    perplexity, nats_per_char, tokens, chars, texts, windows.

    MODEL: a path (folder, .gguf, hub id; its tokenizer is loaded beside it) or a loaded transformers
    model, then with `tokenizer` (a loaded tokenizer or a path). DATA: a text file, a folder, JSONL,
    Parquet or a list of strings. Raises CorpusError, ModelLoadError, ValueError (a loaded model without
    a tokenizer).
    """
    if isinstance(model, (str, os.PathLike)):
        from fusekit.eval.perplexity import evaluate

        rows = evaluate(Path(os.fspath(model)) if isinstance(model, StageResult) else model, data, field=field,
                        max_length=max_length, batch_size=batch_size, device=device, progress=progress)
        return StageResult("eval", None, rows)
    if tokenizer is None:
        raise ValueError("run_eval with a loaded model needs its tokenizer: run_eval(model, data, tokenizer=tok)")
    import torch

    from fusekit.eval.perplexity import evaluate_loaded
    from fusekit.models.load import load_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
    if device is not None:
        model = model.to(torch.device(device))
    rows = evaluate_loaded(
        model.eval(), tokenizer, data, field=field, max_length=max_length, batch_size=batch_size, progress=progress,
        label=Path(str(data)).name if isinstance(data, (str, Path)) else "eval",
    )
    return StageResult("eval", None, rows)


def run_merge(
    base: str | Path | None = None,
    models: Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    *,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    seed: int | None = None,
    config: Any = None,
    **options: Any,
) -> StageResult:
    """Merge fine-tuned HF model folders (FuseChat's fused targets) into OUT, tensor by tensor.

    The argument order of every merge function: base, models, out, then options; with a `config` (a
    mergekit YAML/dict/MergeConfig) only `out` is needed: `run_merge(out=…, config="merge.yml")`, and
    what is passed here wins over the config. `method` (default varm): varm (FuseChat), sce (FuseChat-2.0), linear, task_arithmetic, ties, dare_ties, dare_linear, della,
    della_linear, breadcrumbs, breadcrumbs_ties, model_stock, slerp, nuslerp. Other options are
    `merge_models`'s (t, lam, normalize, dtype, tokenizer_source, max_shard_size, …; docs/MERGE.md).
    `report`: method, models, tensors, bytes read/written, seconds, VaRM weights; `detail` the
    MergeResult. Models are folders (merging streams their safetensors). Raises MergeError.
    """
    from fusekit.merge.options import resolve_request
    from fusekit.merge.run import merge_models

    request = resolve_request(base, models, method, out, weights=weights, density=density, seed=seed, config=config, **options)
    result = merge_models(**request)
    report = {
        "method": result.method, "base": result.base, "models": list(result.models), "tensors": result.tensors,
        "bytes_read": result.bytes_read, "bytes_written": result.bytes_written, "seconds": result.seconds,
        "varm": _jsonable(result.varm) if result.varm is not None else None,
    }
    return StageResult("merge", Path(result.out), report, result)


def run_implicit(config: str | Path | Any, *, progress: bool = True) -> StageResult:
    """Implicit fusion (FuseChat-3.0): sample, score, SFT, DPO/WRPO, as the config (YAML path or
    ImplicitConfig) says; `report` is WORKDIR/results.json. See `fusekit.implicit.run.implicit_fusion`."""
    from fusekit.implicit.config import load_implicit
    from fusekit.implicit.run import implicit_fusion

    config_dir = None
    if isinstance(config, (str, os.PathLike)):
        config_dir = Path(config).resolve().parent
        config = load_implicit(config)
    results = implicit_fusion(config, progress=progress, config_dir=config_dir)
    return StageResult("implicit", Path(config.workdir), results or {})


def run_recipe(recipe: str | Path | Any, *, progress: bool = True) -> StageResult:
    """Run (or resume) a FuseLLM recipe (YAML path or Recipe): extract → align → train → eval.

    `out` is the recipe's workdir; `report` holds eval rows, lm-eval task rows and the alignment report
    (WORKDIR/results.json); `detail` the RunResult. Raises RecipeError and the stages' errors."""
    from fusekit.pipeline import run_recipe as run
    from fusekit.recipe import load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    result = run(recipe, progress=progress)
    return StageResult("recipe", Path(result.layout.root), _jsonable(result.as_json()), result)


def run_fusechat(config: str | Path | Any, *, progress: bool = True) -> StageResult:
    """FuseChat: pairwise fusion of chat sources into the pivot, then a parameter-space merge (VaRM/SCE);
    `config` a YAML path or FuseChatRecipe. `report` is WORKDIR/results.json."""
    from fusekit.fusechat import load_fusechat
    from fusekit.fusechat import run_fusechat as run

    if isinstance(config, (str, os.PathLike)):
        config = load_fusechat(config)
    results = run(config, progress=progress)
    return StageResult("fusechat", Path(config.workdir), results)


def run_plan(recipe: str | Path | Any, *, progress: bool = False) -> StageResult:
    """Token counts, bytes on disk and compute per stage of a recipe, estimated before running it."""
    from fusekit.plan import plan_recipe
    from fusekit.recipe import load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    return StageResult("plan", None, _jsonable(plan_recipe(recipe, progress=progress)))


def run_demo(out: str | Path = "fusekit-demo", *, quick: bool = False, seed: int = 0, real: bool | None = None,
             progress: bool = True) -> StageResult:
    """The bundled demo (tiny real models, bundled corpus): fuse, train, evaluate; `report` is
    OUT/results.json. See `fusekit.demo.run.run_demo`."""
    from fusekit.demo.run import run_demo as run

    return StageResult("demo", Path(out), run(out, quick=quick, seed=seed, real=real, progress=progress))

