"""Stage 1: run a model over a corpus and store its top-k next-token distributions (FUSION-METHOD.md §1).

`fusekit.run_extract(model, data, out, top_k=10, …)` (or `fusekit.extract.extract`, which returns OUT) writes a sharded, resumable store that
`fusekit.store.extract_store.ExtractStore` reads back; `fusekit inspect DIR` summarises and verifies it.
"""

from fusekit._callable import make_module_callable
from fusekit.corpus import CorpusError, corpus_fingerprint
from fusekit.extract.errors import ExtractError
from fusekit.extract.run import extract
from fusekit.store.extract_store import ExtractStore
from fusekit.store.errors import StoreError
from fusekit.models.load import ModelLoadError

make_module_callable(__name__, extract, "fusekit.run_extract (returns a StageResult)")

__all__ = ["CorpusError", "ExtractError", "ExtractStore", "ModelLoadError", "StoreError", "corpus_fingerprint", "extract"]
