"""Stage 4: train the target on λ·CLM + (1−λ)·fusion loss (FUSION-METHOD.md §5).

`fusekit.train(model, aligned, out, lam=0.9, fusion="min_ce", …)`; see `TrainConfig` for every option.
"""

from fusekit._callable import make_module_callable
from fusekit.train.config import PRESETS, TrainConfig, TrainConfigError, build_config
from fusekit.train.data import TrainDataError
from fusekit.train.loop import TrainError, train
from fusekit.train.linear_loss import linear_fusion_loss
from fusekit.train.loss import dense_fused_loss, fused_loss
from fusekit.models.load import ModelLoadError

make_module_callable(__name__, train)

__all__ = [
    "ModelLoadError",
    "PRESETS",
    "TrainConfig",
    "TrainConfigError",
    "TrainDataError",
    "TrainError",
    "build_config",
    "dense_fused_loss",
    "fused_loss",
    "linear_fusion_loss",
    "train",
]
