"""fusekit: knowledge fusion of large language models (FuseLLM, FuseChat).

Pipeline: extract → align → fuse + train → (FuseChat) merge. The alignment API is importable with the
light core install; the stages that need torch/transformers import them only when called.
"""

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

# Stages that need torch/transformers/polars load on first use, so `import fusekit` stays light.
_LAZY = {
    "extract": "fusekit.extract",
    "align_store": "fusekit.align.stage",
    "train": "fusekit.train",
    "evaluate": "fusekit.eval",
    "merge": "fusekit.merge",
    "run_recipe": "fusekit.pipeline",
    "plan_recipe": "fusekit.plan",
    "transfer": "fusekit.align.text_transfer",
    "implicit_fusion": "fusekit.implicit",
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    # Subpackages (`fusekit.zoo`, `fusekit.store`, …) load on first attribute access too.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fusekit' has no attribute {name!r}")


__all__ = [
    *_LAZY,
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
