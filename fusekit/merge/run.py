"""The merge driver: check the inputs agree, plan the output, stream the merge, then write the side files.

`merge_models` takes resolved arguments and returns a MergeResult; `merge` takes a config and/or
arguments (fusekit.merge.options.resolve_request) and returns the output folder.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fusekit.merge.config import MergeConfig
from fusekit.merge.errors import MergeError, MergeWarning
from fusekit.merge.io import (
    CODE_TO_DTYPE,
    REPORT_NAMES,
    ModelFolder,
    OutTensor,
    clear_weights,
    copy_side_files,
    dtype_code,
    is_weight_file,
    parse_size,
)
from fusekit.merge.options import MergeOptions, TensorJob, resolve_options, resolve_request
from fusekit.merge.params import ParamSource, SliceSpec, layer_index
from fusekit.merge.registry import get_method
from fusekit.merge.report import VarmReport
from fusekit.merge.streaming import stream_merge
from fusekit.merge.tokenizer import check_tokenizer_source, copy_tokenizer


@dataclass
class MergeResult:
    """What `merge_models` did: the output folder, the resolved options, sizes in bytes, streaming time in seconds."""

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
    job = TensorJob(spec, opts, source, num_layers, glob_names, model_names, has_base)
    start = time.perf_counter()
    shards, bytes_read = stream_merge(job, plan, base_folder, folders, out, max_bytes, device, report, progress)
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


__all__ = ["MergeResult", "check_compatible", "merge", "merge_models"]
