"""Stage 5 (FuseChat): merge fine-tuned models in parameter space, streaming over safetensors.

`fusekit.merge(base, models, method, out, …)` or `fusekit.merge(config="merge.yml")` (a mergekit YAML as-is)
→ the merged HF folder; `merge_models(…)` → a MergeResult (with the VaRM weights). Methods: varm (FuseChat's
variation ratio merge), sce (FuseChat-2.0), linear, task_arithmetic, ties, dare_ties, dare_linear, della,
della_linear, breadcrumbs, breadcrumbs_ties, model_stock, slerp, nuslerp — see METHODS for names, pretty
names and papers.

Where things are: `run.py` drives a merge (check, plan, stream, side files); `options.py` resolves what was
asked (arguments, config, method defaults, per-tensor settings); `streaming.py` merges and writes one
tensor at a time; `io.py` reads and writes safetensors folders; `config.py` / `params.py` read mergekit
configs and resolve their parameters per tensor. Each method is one module (`varm.py`, `ties.py`, …)
registered in `registry.py`; `sparsify.py` and `topk.py` hold the masks several methods share.
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
from fusekit.merge.errors import MergeError, MergeWarning
from fusekit.merge.options import MergeOptions
from fusekit.merge.registry import METHODS, MergeMethod, TensorInputs, get_method, register_method
from fusekit.merge.report import VarmReport
from fusekit.merge.run import MergeResult, merge, merge_models

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
