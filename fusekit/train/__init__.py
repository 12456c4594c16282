"""Stage 4: train the target on λ·CLM + (1−λ)·fusion loss (FUSION-METHOD.md §5).

`fusekit.train(model, aligned, out, lam=0.9, fusion="min_ce", …)`; see `TrainConfig` for every option.

The names below load on first use: the data loader's worker processes import `fusekit.train.feed`
(numpy, polars, the fusion rules) without paying for torch and transformers.
"""

from fusekit._callable import make_module_callable

_EXPORTS = {
    "ModelLoadError": "fusekit.models.load",
    "PRESETS": "fusekit.train.config",
    "TrainConfig": "fusekit.train.config",
    "TrainConfigError": "fusekit.train.config",
    "build_config": "fusekit.train.config",
    "TrainDataError": "fusekit.train.examples",
    "TrainError": "fusekit.train.loop",
    "train": "fusekit.train.loop",
    "linear_fusion_loss": "fusekit.train.linear_loss",
    "dense_fused_loss": "fusekit.train.loss",
    "fused_loss": "fusekit.train.loss",
}


def __getattr__(name: str):
    import importlib

    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _train(*args, **kwargs):
    from fusekit.train.loop import train

    return train(*args, **kwargs)


_train.__doc__ = "Train MODEL on λ·CLM + (1−λ)·fusion over an aligned store; see `fusekit.train.loop.train`."
make_module_callable(__name__, _train)

__all__ = sorted(_EXPORTS)
