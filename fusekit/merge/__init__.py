"""Stage 5 (FuseChat): merge fine-tuned models in parameter space, streaming over safetensors.

`fusekit.run_merge(base, models, out, method=…)` or `fusekit.run_merge(None, [], out, config="merge.yml")`
(a mergekit YAML as-is) → a StageResult; `merge_models(base, models, out, method)` → a MergeResult (with
the VaRM weights). `fusekit.merge(base, models, method, out)` (the package called) and `merge` are the
previous release's spellings: they still work, with a DeprecationWarning. Methods: varm (FuseChat's
variation ratio merge), sce (FuseChat-2.0), linear, task_arithmetic, ties, dare_ties, dare_linear, della,
della_linear, breadcrumbs, breadcrumbs_ties, model_stock, slerp, nuslerp — see METHODS for names, pretty
names and papers.

Where things are: `run.py` drives a merge (check, plan, stream, side files); `options.py` resolves what was
asked (arguments, config, method defaults, per-tensor settings); `streaming.py` merges and writes one
tensor at a time; `io.py` reads and writes safetensors folders; `config.py` / `params.py` read mergekit
configs and resolve their parameters per tensor. Each method is one module (`varm.py`, `ties.py`, …)
registered in `registry.py`; `sparsify.py` and `topk.py` hold the masks several methods share.
"""

from fusekit._callable import deprecated, make_module_callable
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
from fusekit.merge.run import MergeResult, merge_models
from fusekit.merge.run import merge as _merge

merge = deprecated("fusekit.merge.merge", "fusekit.run_merge(base, models, out, method=…)", _merge)
make_module_callable(__name__, _merge, "fusekit.run_merge(base, models, out, method=…) (returns a StageResult)")

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
