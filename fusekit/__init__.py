"""fusekit: knowledge fusion of large language models (FuseLLM, FuseChat).

Pipeline: extract → align → fuse + train → (FuseChat) merge. Each stage is a plain function,
`fusekit.run_extract / run_align / run_train / run_eval / run_merge / run_implicit / run_recipe /
run_fusechat / run_plan / run_demo`, returning a `StageResult` (fusekit/api.py). The token-alignment
API below is importable with the light core install; the stages import torch/transformers when called.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from fusekit._version import __version__
from fusekit.align import (
    AlignedTopk,
    Scheme,
    TokenTable,
    VocabMapStats,
    align_ids_batch,
    align_tokens,
    align_tokens_batch,
    align_topk,
    map_vocab,
    map_vocab_with_stats,
    normalize_token,
    normalize_tokens,
    normalize_vocab,
    token_scheme,
)

# The public API. fusekit/api.py imports the stages inside its functions, so this stays light (no torch).
from fusekit.api import __all__ as _API_NAMES
from fusekit.api import (
    StageResult,
    run_align,
    run_demo,
    run_distill,
    run_eval,
    run_extract,
    run_fusechat,
    run_implicit,
    run_merge,
    run_plan,
    run_recipe,
    run_train,
)

_LAZY = {
    "transfer": "fusekit.align.text_transfer",
    "plan_recipe": "fusekit.plan",
}
# The previous release's spellings: (module, function, what to use now). `fusekit.extract`, `fusekit.train`
# and `fusekit.merge` are the packages, callable for this release with a warning (fusekit/_callable.py).
_DEPRECATED = {
    "align_store": ("fusekit.align.stage", "align_store", "fusekit.run_align (returns a StageResult)"),
    "evaluate": ("fusekit.eval.perplexity", "evaluate", "fusekit.run_eval (returns a StageResult)"),
    "implicit_fusion": ("fusekit.implicit.run", "implicit_fusion", "fusekit.run_implicit (returns a StageResult)"),
}

if _TYPE_CHECKING:  # what type checkers and IDEs see of the lazy names
    from fusekit.align.text_transfer import transfer
    from fusekit.plan import plan_recipe


def __getattr__(name: str):
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    if name in _DEPRECATED:
        from fusekit._callable import deprecated

        module, attr, new = _DEPRECATED[name]
        return deprecated(f"fusekit.{name}", new, getattr(importlib.import_module(module), attr))
    # Subpackages (`fusekit.extract`, `fusekit.zoo`, `fusekit.store`, …) load on first attribute access too.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fusekit' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    *_API_NAMES,

    "AlignedTopk",
    "Scheme",
    "TokenTable",
    "VocabMapStats",
    "__version__",
    "align_ids_batch",
    "align_tokens",
    "align_tokens_batch",
    "align_topk",
    "map_vocab",
    "map_vocab_with_stats",
    "normalize_token",
    "normalize_tokens",
    "normalize_vocab",
    "token_scheme",
]
