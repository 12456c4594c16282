"""What a merge was asked for, resolved: explicit arguments first, then a config's, then the method's defaults.

Three levels, each raising MergeError that names the option at fault:
- `resolve_request`: `merge()`'s arguments and a config (mergekit YAML, dict or MergeConfig) → the keyword
  arguments of `merge_models`;
- `resolve_options`: a method's explicit options, checked against the method and the number of models;
- `TensorJob.inputs`: the options of one tensor (config settings may vary per tensor: gradients over
  layers, filters, slices; fusekit.merge.params), checked again where they are resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fusekit.merge.config import MergeConfig, load_config, validate_config
from fusekit.merge.errors import MergeError
from fusekit.merge.params import ParamSource, SliceSpec
from fusekit.merge.registry import MergeMethod, TensorInputs, get_method


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


@dataclass(frozen=True)
class MergeOptions:
    """A method's options, resolved against its defaults and checked for the number of models."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    t: float
    lam: float
    normalize: bool
    seed: int


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


@dataclass(frozen=True)
class TensorJob:
    """Everything a merge decides once, from which each tensor's method inputs are resolved."""

    spec: MergeMethod
    opts: MergeOptions
    source: ParamSource  # the config's settings, resolved per tensor
    num_layers: int
    glob_names: dict  # the method's per-merge parameters → defaults (MergeMethod.parameter_names)
    model_names: dict  # … and its per-model ones
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
