"""Stage 2: token alignment, vocabulary mapping and moving source distributions onto target tokens.

The modules, lowest first (each imports only modules above it in this list):

* `tokens` DTW alignment and MinED vocabulary mapping (the Rust core); `spans` exact byte spans of
  tokens and `remap` byte spans carried between two renderings of one chat (the readable references of
  `rust/src/spans.rs`, which the byte-span transfer runs); `probe_texts` small texts that stress
  cross-tokenizer transfer (benchmarks).
* `vocab_cache` FuseLLM's vocabulary map, cached per tokenizer pair.
* `transfer` the three methods' engine (`Transferer`: bytespan, fusellm, fusechat).
* `recall` perfect-source recall.
* `inputs` the extraction stores `fusekit align` reads, and one model's tokens of a whole text.
* `statmap` FuseChat's statistical vocabulary map (counts and the map); `corpus_statmap` the map of a
  store pair over its corpus (counted in parts, one shared, locked cache entry).
* `text_transfer` the text-level API `fusekit.transfer`.
* `candidates` the target's own candidate and what every method's candidates share; `carry` the 1:1
  carry (`fusellm`, `fusechat`); `bytespan` the byte-span transfer of whole texts.
* `shard` one shard aligned and written a row group at a time; `report` report.json; `ray_runner` shards
  as Ray tasks.
* `stage` `align_store` (`fusekit.run_align`): the stage over stores.
"""

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
