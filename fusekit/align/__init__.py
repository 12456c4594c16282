"""Stage 2: token alignment, vocabulary mapping and moving source distributions onto target tokens."""

from fusekit.vocab.normalize import Scheme, normalize_token, normalize_tokens, normalize_vocab, token_scheme
from fusekit.align.tokens import (
    AlignedTopk,
    TokenTable,
    VocabMapStats,
    align_ids_batch,
    align_tokens,
    align_tokens_batch,
    align_topk,
    map_vocab,
    map_vocab_with_stats,
)

__all__ = [
    "AlignedTopk",
    "Scheme",
    "TokenTable",
    "VocabMapStats",
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
