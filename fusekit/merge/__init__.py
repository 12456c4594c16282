"""Stage 5 (FuseChat): merge fine-tuned models in parameter space, streaming over safetensors.

`fusekit.merge(base, models, method, out, …)` or `fusekit.merge(config="merge.yml")` (a mergekit YAML as-is)
→ the merged HF folder; `merge_models(…)` → a MergeResult (with the VaRM weights). Methods: varm (FuseChat's
variation ratio merge), sce (FuseChat-2.0), linear, task_arithmetic, ties, dare_ties, dare_linear, della,
della_linear, breadcrumbs, breadcrumbs_ties, model_stock, slerp, nuslerp — see METHODS for names, pretty
names and papers.
"""

from fusekit._callable import make_module_callable
from fusekit.merge import (  # noqa: F401  (register methods)
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
    varm,
)
from fusekit.merge.config import MergeConfig, ModelEntry, load_config
from fusekit.merge.engine import MergeOptions, MergeResult, MergeWarning, merge, merge_models
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
    "MergeWarning",
    "ModelEntry",
    "TensorInputs",
    "VarmReport",
    "get_method",
    "load_config",
    "merge",
    "merge_models",
    "register_method",
]
