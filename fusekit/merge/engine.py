"""The merge loop: check the inputs agree, plan the output, then merge and write one tensor at a time."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from fusekit.merge.config import MergeConfig, load_config, validate_config
from fusekit.merge.errors import MergeError
from fusekit.merge.io import (
    CODE_TO_DTYPE,
    REPORT_NAMES,
    ModelFolder,
    OutTensor,
    ShardedWriter,
    clear_weights,
    copy_side_files,
    dtype_code,
    is_weight_file,
    parse_size,
)
from fusekit.merge.params import ParamSource, SliceSpec, layer_index
from fusekit.merge.registry import MergeMethod, TensorInputs, get_method
from fusekit.merge.report import VarmReport
from fusekit.merge.tokenizer import check_tokenizer_source, copy_tokenizer


class MergeWarning(UserWarning):
    """A config setting fusekit ignores, as mergekit does (a parameter the method does not read)."""


@dataclass(frozen=True)
class MergeOptions:
    """A method's options, resolved against its defaults and checked for the number of models."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    t: float
    lam: float
    normalize: bool
    seed: int


@dataclass
class MergeResult:
    out: Path
    method: str
    base: str
    models: list[str]
    options: MergeOptions
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    shards: list[Path]
    varm: VarmReport | None = None


def resolve_options(
    spec: MergeMethod,
    k: int,
    *,
    weights: Sequence[float] | None,
    density: float | Sequence[float] | None,
    t: float | None,
    lam: float | None,
    normalize: bool | None,
    seed: int,
    configured: frozenset[str] | set[str] = frozenset(),
) -> MergeOptions:
    """Check the explicit options against the method and fill in its defaults.

    `configured`: parameter names a config sets (they may vary per tensor and are checked there); a
    method's required density may come from it. Raises MergeError naming the option at fault.
    """
    given = {"weights": weights, "density": density, "t": t, "lambda": lam, "normalize": normalize}
    for option, value in given.items():
        if value is not None and option not in spec.options:
            takes = ", ".join(o for o in ("weights", "density", "t", "lambda", "normalize") if o in spec.options)
            raise MergeError(f"method {spec.name} takes no {option} option (it takes: {takes or 'none'})")
    if k < spec.min_models or (spec.max_models is not None and k > spec.max_models):
        want = f"{spec.min_models}–{spec.max_models}" if spec.max_models else f"at least {spec.min_models}"
        raise MergeError(f"method {spec.name} merges {want} model(s) besides the base; got {k}")

    w = tuple(float(x) for x in weights) if weights is not None else (1.0,) * k
    if len(w) != k:
        raise MergeError(f"{len(w)} weights given for {k} models: give one weight per model")
    norm = spec.default_normalize if normalize is None else bool(normalize)
    if spec.name == "linear" and norm and abs(sum(w)) < 1e-12:
        raise MergeError("linear merge weights sum to 0: they cannot be normalised")

    if density is None:
        density = spec.default_density
        if density is None and "density" in spec.options and "density" not in configured:
            raise MergeError(
                f"method {spec.name} needs a density (the share of each task vector kept, e.g. 0.1 keeps 10%, "
                "the DARE paper's drop rate 0.9)"
            )
    if density is None:
        d: tuple[float, ...] = (1.0,) * k if "density" not in configured else ()
    elif isinstance(density, (int, float)):
        d = (float(density),) * k
    else:
        d = tuple(float(x) for x in density)
    if d and len(d) != k:
        raise MergeError(f"{len(d)} densities given for {k} models: give one, or one per model")
    if any(not 0 < x <= 1 for x in d):
        raise MergeError(f"density must lie in (0, 1]; got {list(d)}")

    t = 0.5 if t is None else float(t)
    if not 0 <= t <= 1:
        raise MergeError(f"slerp's t must lie in [0, 1]; got {t}")
    return MergeOptions(w, d, t, 1.0 if lam is None else float(lam), norm, int(seed))


def check_compatible(base: ModelFolder, models: list[ModelFolder], allow_dtype_mismatch: bool) -> None:
    """Every model has the base's tensors with the base's shapes (and dtypes); else name the first culprit."""
    tied_base = base.config().get("tie_word_embeddings")
    for m in models:
        missing = [n for n in base.tensors if n not in m.tensors]
        extra = [n for n in m.tensors if n not in base.tensors]
        if missing or extra:
            name, has, lacks = (missing[0], base.path, m.path) if missing else (extra[0], m.path, base.path)
            hint = ""
            tied = m.config().get("tie_word_embeddings")
            if tied != tied_base:
                hint = (
                    f" — tie_word_embeddings is {tied_base} in the base but {tied} in {m.path}: "
                    "untie (or tie) them the same way before merging"
                )
            count = len(missing) + len(extra)
            raise MergeError(f"tensor {name!r} is in {has} but not in {lacks} ({count} tensor(s) differ){hint}")
        for name, info in base.tensors.items():
            other = m.tensors[name]
            if other.shape != info.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {list(info.shape)} in the base {base.path} but {list(other.shape)} "
                    f"in {m.path}: only models of one architecture and vocabulary can be merged"
                )
            if other.dtype != info.dtype and not (allow_dtype_mismatch and info.is_float and other.is_float):
                raise MergeError(
                    f"tensor {name!r} is {info.dtype} in the base {base.path} but {other.dtype} in {m.path}: "
                    "save the models in one dtype, or allow the mismatch (allow_dtype_mismatch=True, "
                    "--allow-dtype-mismatch) to compute in float32 and write the base's dtype"
                )


def _prepare_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for p in inputs:
        if p.resolve() == resolved:
            raise MergeError(f"the output folder {out} is one of the inputs: choose another --out")
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = [p.name for p in out.iterdir() if p.is_file() and is_weight_file(p)]
    if old and not overwrite:
        raise MergeError(
            f"{out} already holds model weights ({old[0]}): choose an empty folder or overwrite "
            "(overwrite=True, --overwrite)"
        )
    if old:
        clear_weights(out)
        for name in REPORT_NAMES:
            (out / name).unlink(missing_ok=True)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]merge"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensor]}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


def merge_models(
    base: str | Path | None,
    models: Sequence[str | Path],
    out: str | Path,
    method: str = "varm",
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    t: float | None = None,
    lam: float | None = None,
    normalize: bool | None = None,
    seed: int = 0,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    slices: Sequence[SliceSpec] | None = None,
    tokenizer_source: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    allow_dtype_mismatch: bool = False,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> MergeResult:
    """Merge `models` (HF folders fine-tuned from `base`) with `method` into the HF folder `out`.

    Streams one tensor at a time; `out` gets the merged safetensors (sharded at `max_shard_size`, with an
    index), the base's config and tokenizer files (or `tokenizer_source`'s tokenizer), `fusekit_merge.json`
    (what was merged, how), and for VaRM `varm_weights.json` + `varm_weights.png`.

    `parameters` / `model_parameters` / `slices` are mergekit settings (scalars, gradients over layers,
    filtered lists; fusekit.merge.params) resolved per tensor; explicit `weights`, `density`, `t`, `lam`,
    `normalize` win over them. `base` may be None for methods that need none (linear, nuslerp): the first
    model then supplies config and tokenizer. Raises MergeError before writing anything for inputs or
    options that cannot be merged. Returns what was done, including the VaRM weights.
    """
    spec = get_method(method)
    model_paths = [Path(m).expanduser() for m in models]
    if not model_paths:
        raise MergeError("no models to merge: give at least one model besides the base")
    has_base = base is not None
    if not has_base and spec.needs_base:
        raise MergeError(f"method {spec.name} needs a base model (base_model: in the config, --base)")
    base_path = Path(base).expanduser() if has_base else model_paths[0]
    k = len(model_paths)
    parameters = dict(parameters or {})
    model_params = [dict(p) for p in (model_parameters or [{} for _ in model_paths])]
    if len(model_params) != k:
        raise MergeError(f"{len(model_params)} per-model parameter sets for {k} models")
    slices = list(slices) if slices else None
    configured = set(parameters).union(*model_params)
    for sl in slices or []:
        configured |= set(sl.parameters).union(*sl.model_parameters)
    opts = resolve_options(
        spec, k, weights=weights, density=density, t=t, lam=lam, normalize=normalize, seed=seed, configured=configured
    )
    glob_names, model_names = spec.parameter_names()
    ignored = sorted(configured - set(glob_names) - set(model_names))
    if ignored:
        warnings.warn(f"method {spec.name} reads no {', '.join(ignored)}: ignored (as mergekit does)", MergeWarning, stacklevel=2)
    if spec.name == "slerp" and len(model_paths) == 2 and model_paths[1].resolve() == base_path.resolve():
        # t = 0 means the base when the base is one of the two (mergekit's convention).
        model_paths.reverse()
        model_params.reverse()
        slices = [SliceSpec(s.start, s.end, s.parameters, list(s.model_parameters)[::-1]) for s in slices] if slices else None
        weights = list(weights)[::-1] if weights is not None else None
        density = list(density)[::-1] if isinstance(density, (list, tuple)) else density
        opts = MergeOptions(opts.weights[::-1], opts.densities[::-1], opts.t, opts.lam, opts.normalize, opts.seed)
    if spec.name == "nuslerp" and has_base and any(p.resolve() == base_path.resolve() for p in model_paths):
        raise MergeError("nuslerp: the base cannot be one of the two models (mergekit's rule): drop base_model or list two others")
    out_code = dtype_code(dtype) if dtype else None
    max_bytes = parse_size(max_shard_size)
    device = torch.device(device)

    base_folder = ModelFolder(base_path)
    folders = [ModelFolder(p) for p in model_paths]
    check_compatible(base_folder, folders, allow_dtype_mismatch)
    num_layers = 1 + max((i for i in map(layer_index, base_folder.tensors) if i is not None), default=-1)
    if slices and (slices[-1].end != num_layers):
        raise MergeError(
            f"slices cover layers 0–{slices[-1].end - 1} but the models have {num_layers} layers: fusekit keeps "
            "every layer (dropping or stacking layers needs mergekit)"
        )
    tokenizer_from = check_tokenizer_source(tokenizer_source, base_path, model_paths)
    source = ParamSource(
        model_parameters=model_params,
        parameters=parameters,
        slices=slices,
        overrides={"t": t, "lambda": lam, "normalize": normalize, "density": density if isinstance(density, (int, float)) else None},
        model_overrides=[
            {"weight": weights[j] if weights is not None else None,
             "density": density[j] if isinstance(density, (list, tuple)) else None}
            for j in range(k)
        ],  # fmt: skip
    )
    out = Path(out).expanduser()
    _prepare_out(out, [base_path, *model_paths], overwrite)

    plan = [
        OutTensor(info.name, info.shape, out_code if (out_code and info.is_float) else info.dtype)
        for info in base_folder.tensors.values()
    ]
    report = VarmReport([str(p) for p in model_paths]) if spec.name == "varm" else None
    job = _Job(spec, opts, source, num_layers, glob_names, model_names, has_base)
    start = time.perf_counter()
    shards, bytes_read = _stream(job, plan, base_folder, folders, out, max_bytes, device, report, progress)
    seconds = time.perf_counter() - start

    copy_side_files(base_path, out)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)
    if out_code:
        _set_config_dtype(out / "config.json", out_code)
    record = {
        "method": spec.name, "reference": spec.reference, "base": str(base_path) if has_base else None,
        "models": [str(p) for p in model_paths], "weights": list(opts.weights), "densities": list(opts.densities),
        "t": opts.t, "lambda": opts.lam, "normalize": opts.normalize, "seed": opts.seed, "dtype": dtype,
        "parameters": parameters, "model_parameters": model_params,
        "slices": [asdict(s) for s in slices] if slices else None, "tokenizer_source": tokenizer_source,
        "shards": [p.name for p in shards],
    }  # fmt: skip
    (out / "fusekit_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if report is not None:
        report.write_json(out / "varm_weights.json")
        if plot:
            report.plot(out / "varm_weights.png")
    return MergeResult(
        out=out,
        method=spec.name,
        base=str(base_path),
        models=[str(p) for p in model_paths],
        options=opts,
        tensors=len(plan),
        bytes_read=bytes_read,
        bytes_written=sum(o.nbytes for o in plan),
        seconds=seconds,
        shards=shards,
        varm=report,
    )


@dataclass(frozen=True)
class _Job:
    spec: MergeMethod
    opts: MergeOptions
    source: ParamSource
    num_layers: int
    glob_names: dict
    model_names: dict
    has_base: bool

    def inputs(self, name: str, base: torch.Tensor, models: list[torch.Tensor]) -> TensorInputs:
        """The method's inputs for one tensor, its parameters resolved and checked."""
        g, per = self.source.resolve(name, self.num_layers, self.glob_names, self.model_names)
        k = len(models)
        weights = tuple(float(p["weight"]) for p in per) if "weight" in self.model_names else (1.0,) * k
        densities: tuple[float, ...] = (1.0,) * k
        if "density" in self.model_names:
            if any(p["density"] is None for p in per):
                raise MergeError(f"method {self.spec.name} needs a density for tensor {name!r} (none of the config's settings matched it)")
            densities = tuple(float(p["density"]) for p in per)
            if any(not 0 < d <= 1 for d in densities):
                raise MergeError(f"tensor {name!r}: density must lie in (0, 1]; got {list(densities)}")
        t = float(g.get("t", 0.5))
        if not 0 <= t <= 1:
            raise MergeError(f"tensor {name!r}: slerp's t must lie in [0, 1]; got {t}")
        normalize = bool(g.get("normalize", False))
        if self.spec.name == "linear" and normalize and abs(sum(weights)) < 1e-12:
            raise MergeError(f"tensor {name!r}: linear merge weights sum to 0: they cannot be normalised")
        return TensorInputs(
            name=name, base=base, models=models, weights=weights, densities=densities, t=t,
            lam=float(g.get("lambda", 1.0)), normalize=normalize, seed=self.opts.seed, params=g,
            model_params=tuple(per), has_base=self.has_base, owned=True,
        )  # fmt: skip


def _stream(job: _Job, plan, base_folder, folders, out, max_bytes, device, report, progress) -> tuple[list[Path], int]:
    """Merge and write the planned tensors one by one; returns the shard paths and the bytes read."""
    writer = ShardedWriter(out, plan, max_bytes)
    sizes = {o.name: base_folder.tensors[o.name].nbytes + sum(f.tensors[o.name].nbytes for f in folders) for o in plan}
    try:
        with _progress(progress) as bar:
            task = bar.add_task("merge", total=sum(sizes.values()), tensor="")
            for target in plan:
                bar.update(task, tensor=target.name)
                merged, info_row = _merge_one(job, base_folder.tensors[target.name], base_folder, folders, device)
                writer.write(target.name, merged.to(CODE_TO_DTYPE[target.dtype]))
                del merged
                if report is not None and info_row is not None:
                    report.add(target.name, info_row)
                bar.advance(task, sizes[target.name])
        return writer.finish(), sum(sizes.values())
    except BaseException:
        writer.abort()
        raise


def _merge_one(job: _Job, info, base_folder: ModelFolder, folders: list[ModelFolder], device):
    # The models' tensors are ours to overwrite (owned=True): `.to` copies them, or, where it does not,
    # safe_open returns a private copy-on-write mapping (writes never reach the file).
    base_t = base_folder.read(info.name)
    if not info.is_float:
        # Integer/bool buffers (position ids, masks) are not parameters: they are the base's.
        return base_t, None
    work = torch.float64 if info.dtype == "F64" else torch.float32
    inputs = job.inputs(
        info.name,
        base_t.to(device=device, dtype=work),
        [f.read(info.name).to(device=device, dtype=work) for f in folders],
    )
    result = job.spec.fn(inputs)
    return result.tensor, result.info


def _set_config_dtype(path: Path, code: str) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = str(CODE_TO_DTYPE[code]).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge(
    base: str | Path | None = None,
    models: Sequence[str | Path] | None = None,
    method: str | None = None,
    out: str | Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    seed: int | None = None,
    config: str | Path | MergeConfig | dict | None = None,
    **options,
) -> Path:
    """Merge fine-tuned HF model folders into `out`; returns `out`.

    `method`: any of fusekit.merge.METHODS — varm (FuseChat, the default), sce (FuseChat-2.0), linear,
    task_arithmetic, ties, dare_ties, dare_linear, della, della_linear, breadcrumbs, breadcrumbs_ties,
    model_stock, slerp, nuslerp. A `config` (YAML path, dict or MergeConfig: a mergekit configuration
    as-is, or fusekit's spelling) supplies anything not passed here; arguments given here win. Other
    options (t, lam, normalize, dtype, tokenizer_source, max_shard_size, allow_dtype_mismatch, device,
    overwrite, progress, plot) are those of `merge_models`; see docs/MERGE.md. Raises MergeError.
    """
    request = resolve_request(base, models, method, out, weights=weights, density=density, seed=seed, config=config, **options)
    return merge_models(**request).out


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def resolve_request(
    base: str | Path | None,
    models: Sequence[str | Path] | None,
    method: str | None,
    out: str | Path | None,
    *,
    config: str | Path | MergeConfig | dict | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    seed: int | None = None,
    t: float | None = None,
    lam: float | None = None,
    normalize: bool | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    tokenizer_source: str | None = None,
    **rest,
) -> dict:
    """The keyword arguments of `merge_models`: explicit values first, then the config's, then defaults.

    Models listed explicitly replace the config's models (and their per-model parameters and slices);
    the config's top-level parameters still apply. With the config's models, mergekit's base rules hold:
    the base listed among the models is read as the base only (except for linear, slerp and nuslerp), and
    linear refuses a base_model that is not listed (mergekit would average it in with no weight).
    """
    cfg = _as_config(config)
    method = method or cfg.method or "varm"
    model_parameters = slices = None
    if models is None or len(models) == 0:
        models = cfg.model_paths()
        model_parameters = cfg.model_parameters()
        slices = cfg.slice_specs()
        if cfg.base is not None and base is None:
            listed = [i for i, m in enumerate(models) if _same(m, cfg.base)]
            if method == "linear" and not listed:
                raise MergeError(
                    "linear: mergekit averages base_model in as one more model, with no weight given: list it "
                    "under models with its weight, or remove base_model"
                )
            if listed and method not in ("linear", "slerp", "nuslerp"):
                keep = [i for i in range(len(models)) if i not in listed]
                models = [models[i] for i in keep]
                model_parameters = [model_parameters[i] for i in keep]
                if slices:
                    slices = [SliceSpec(s.start, s.end, s.parameters, [s.model_parameters[i] for i in keep]) for s in slices]
    base = base if base is not None else cfg.base
    out = out if out is not None else cfg.out
    if base is None and get_method(method).needs_base:
        raise MergeError("no base model: give the base (the pivot the models were fine-tuned from)")
    if out is None:
        raise MergeError("no output folder: give out (--out)")
    return dict(
        base=base,
        models=models,
        out=out,
        method=method,
        weights=weights,
        density=density,
        t=t,
        lam=lam,
        normalize=normalize,
        seed=seed if seed is not None else cfg.seed,
        parameters=cfg.parameters,
        model_parameters=model_parameters,
        slices=slices,
        tokenizer_source=tokenizer_source or cfg.tokenizer_source,
        dtype=dtype or cfg.out_dtype or cfg.dtype,
        max_shard_size=max_shard_size or cfg.max_shard_size,
        **rest,
    )


def _as_config(config: str | Path | MergeConfig | dict | None) -> MergeConfig:
    if config is None:
        return MergeConfig()
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        return validate_config(config)
    return load_config(config)


__all__ = ["MergeOptions", "MergeResult", "MergeWarning", "merge", "merge_models", "resolve_options", "resolve_request"]
