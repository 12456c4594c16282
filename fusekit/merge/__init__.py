"""Stage 5 (FuseChat): merge fine-tuned models in parameter space, streaming over safetensors.

`fusekit.merge(base, models, method, out, …)` → the merged HF folder; `merge_models(…)` → a MergeResult
(with the VaRM weights). Methods: varm (FuseChat's variation ratio merge), linear, task_arithmetic,
ties, dare_ties, dare_linear, slerp — see METHODS for names, pretty names and papers.
"""

from fusekit._callable import make_module_callable
from fusekit.merge import dare, linear, slerp, task_arithmetic, ties, varm  # noqa: F401  (register methods)
from fusekit.merge.config import MergeConfig, ModelEntry, load_config
from fusekit.merge.engine import MergeOptions, MergeResult, merge, merge_models
from fusekit.merge.errors import MergeError
from fusekit.merge.registry import METHODS, MergeMethod, TensorInputs, get_method, register_method
from fusekit.merge.report import VarmReport

make_module_callable(__name__, merge)

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeError",
    "MergeMethod",
    "MergeOptions",
    "MergeResult",
    "ModelEntry",
    "TensorInputs",
    "VarmReport",
    "get_method",
    "load_config",
    "merge",
    "merge_models",
    "register_method",
]
