"""The merge loop: check the inputs agree, plan the output, then merge and write one tensor at a time."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from fusekit.merge.config import MergeConfig, load_config
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
from fusekit.merge.registry import MergeMethod, TensorInputs, get_method
from fusekit.merge.report import VarmReport


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
) -> MergeOptions:
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
        if density is None and "density" in spec.options:
            raise MergeError(
                f"method {spec.name} needs a density (the share of each task vector kept, e.g. 0.1 keeps 10%, "
                "the DARE paper's drop rate 0.9)"
            )
    if density is None:
        d: tuple[float, ...] = (1.0,) * k
    elif isinstance(density, (int, float)):
        d = (float(density),) * k
    else:
        d = tuple(float(x) for x in density)
    if len(d) != k:
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
    base: str | Path,
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
    index), the base's config and tokenizer files, `fusekit_merge.json` (what was merged, how), and for VaRM
    `varm_weights.json` + `varm_weights.png`. Returns what was done, including the VaRM weights.
    """
    spec = get_method(method)
    model_paths = [Path(m).expanduser() for m in models]
    base_path = Path(base).expanduser()
    if not model_paths:
        raise MergeError("no models to merge: give at least one model besides the base")
    opts = resolve_options(spec, len(model_paths), weights=weights, density=density, t=t, lam=lam, normalize=normalize, seed=seed)
    if spec.name == "slerp" and len(model_paths) == 2 and model_paths[1].resolve() == base_path.resolve():
        # t = 0 means the base when the base is one of the two (mergekit's convention).
        model_paths.reverse()
        opts = MergeOptions(opts.weights[::-1], opts.densities[::-1], opts.t, opts.lam, opts.normalize, opts.seed)
    out_code = dtype_code(dtype) if dtype else None
    max_bytes = parse_size(max_shard_size)
    device = torch.device(device)

    base_folder = ModelFolder(base_path)
    folders = [ModelFolder(p) for p in model_paths]
    check_compatible(base_folder, folders, allow_dtype_mismatch)
    out = Path(out).expanduser()
    _prepare_out(out, [base_path, *model_paths], overwrite)

    plan = [
        OutTensor(info.name, info.shape, out_code if (out_code and info.is_float) else info.dtype)
        for info in base_folder.tensors.values()
    ]
    report = VarmReport([str(p) for p in model_paths]) if spec.name == "varm" else None
    start = time.perf_counter()
    shards, bytes_read = _stream(spec, opts, plan, base_folder, folders, out, max_bytes, device, report, progress)
    seconds = time.perf_counter() - start

    copy_side_files(base_path, out)
    if out_code:
        _set_config_dtype(out / "config.json", out_code)
    record = {
        "method": spec.name, "reference": spec.reference, "base": str(base_path), "models": [str(p) for p in model_paths],
        "weights": list(opts.weights), "densities": list(opts.densities), "t": opts.t, "lambda": opts.lam,
        "normalize": opts.normalize, "seed": opts.seed, "dtype": dtype, "shards": [p.name for p in shards],
    }  # fmt: skip
    (out / "fusekit_merge.json").write_text(json.dumps(record, indent=2) + "\n")
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


def _stream(spec, opts, plan, base_folder, folders, out, max_bytes, device, report, progress) -> tuple[list[Path], int]:
    """Merge and write the planned tensors one by one; returns the shard paths and the bytes read."""
    writer = ShardedWriter(out, plan, max_bytes)
    sizes = {o.name: base_folder.tensors[o.name].nbytes + sum(f.tensors[o.name].nbytes for f in folders) for o in plan}
    try:
        with _progress(progress) as bar:
            task = bar.add_task("merge", total=sum(sizes.values()), tensor="")
            for target in plan:
                bar.update(task, tensor=target.name)
                merged, info_row = _merge_one(spec, opts, base_folder.tensors[target.name], base_folder, folders, device)
                writer.write(target.name, merged.to(CODE_TO_DTYPE[target.dtype]))
                del merged
                if report is not None and info_row is not None:
                    report.add(target.name, info_row)
                bar.advance(task, sizes[target.name])
        return writer.finish(), sum(sizes.values())
    except BaseException:
        writer.abort()
        raise


def _merge_one(spec, opts: MergeOptions, info, base_folder: ModelFolder, folders: list[ModelFolder], device):
    base_t = base_folder.read(info.name)
    if not info.is_float:
        # Integer/bool buffers (position ids, masks) are not parameters: they are the base's.
        return base_t, None
    work = torch.float64 if info.dtype == "F64" else torch.float32
    inputs = TensorInputs(
        name=info.name,
        base=base_t.to(device=device, dtype=work),
        models=[f.read(info.name).to(device=device, dtype=work) for f in folders],
        weights=opts.weights,
        densities=opts.densities,
        t=opts.t,
        lam=opts.lam,
        normalize=opts.normalize,
        seed=opts.seed,
    )
    result = spec.fn(inputs)
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

    `method`: varm (FuseChat, the default), linear, task_arithmetic, ties, dare_ties, dare_linear or slerp.
    A `config` (YAML path, dict or MergeConfig; mergekit's field names accepted) supplies anything not
    passed here; arguments given here win. Other options (t, lam, normalize, dtype, max_shard_size,
    allow_dtype_mismatch, device, overwrite, progress, plot) are those of `merge_models`; see docs/MERGE.md.
    """
    request = resolve_request(base, models, method, out, weights=weights, density=density, seed=seed, config=config, **options)
    return merge_models(**request).out


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
    **rest,
) -> dict:
    """The keyword arguments of `merge_models`: explicit values first, then the config's, then defaults."""
    cfg = _as_config(config)
    if models is None or len(models) == 0:
        models = [m.model for m in cfg.models]
        weights = weights if weights is not None else cfg.weights()
        density = density if density is not None else cfg.densities()
    base = base if base is not None else cfg.base
    out = out if out is not None else cfg.out
    if base is None:
        raise MergeError("no base model: give the base (the pivot the models were fine-tuned from)")
    if out is None:
        raise MergeError("no output folder: give out (--out)")
    return dict(
        base=base,
        models=models,
        out=out,
        method=method or cfg.method or "varm",
        weights=weights,
        density=density,
        t=t if t is not None else cfg.t,
        lam=lam if lam is not None else cfg.lam,
        normalize=normalize if normalize is not None else cfg.normalize,
        seed=seed if seed is not None else cfg.seed,
        dtype=dtype or cfg.dtype,
        max_shard_size=max_shard_size or cfg.max_shard_size,
        **rest,
    )


def _as_config(config: str | Path | MergeConfig | dict | None) -> MergeConfig:
    if config is None:
        return MergeConfig()
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        from pydantic import ValidationError

        try:
            return MergeConfig.model_validate(config)
        except ValidationError as exc:
            raise MergeError(f"merge config: {exc.errors()[0]['msg']}") from None
    return load_config(config)


__all__ = ["MergeOptions", "MergeResult", "merge", "merge_models", "resolve_options", "resolve_request"]
