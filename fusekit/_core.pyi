# Type stubs of the Rust extension (rust/src/py.rs). Users call the wrappers in fusekit.align and
# fusekit.store; these signatures are for editors and type checkers.

from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt

class TokenTable:
    """A vocabulary's token strings, converted once so alignments can be asked for by token ids."""

    def __init__(self, tokens: Sequence[str]) -> None: ...
    def __len__(self) -> int: ...

def align_tokens(src: Sequence[str], tgt: Sequence[str]) -> npt.NDArray[np.int64]:
    """DTW path, shape (P, 2), from (0, 0) to (m−1, n−1); ValueError on empty input."""

def align_tokens_batch(
    pairs: Sequence[tuple[Sequence[str], Sequence[str]]], threads: Optional[int] = None
) -> list[npt.NDArray[np.int64]]: ...
def align_ids_batch(
    src_table: TokenTable,
    tgt_table: TokenTable,
    pairs: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
    threads: Optional[int] = None,
) -> list[npt.NDArray[np.int64]]: ...
def map_vocab(
    src_vocab: Sequence[str], tgt_vocab: Sequence[str], threads: Optional[int] = None, tgt_usable: Optional[Sequence[bool]] = None
) -> tuple[npt.NDArray[np.int64], int]:
    """(target index per source token, number of exact matches); only `tgt_usable` targets are chosen."""

class TransferSource:
    """A source vocabulary for `transfer_texts`: byte strings (b"" for special / padded ids), end-of-sequence
    and end-of-turn ids."""

    def __init__(self, tokens: Sequence[bytes], eos: Optional[int] = None, eot: Optional[int] = None) -> None: ...
    def __len__(self) -> int: ...
    def spans(self, text: bytes, ids: npt.NDArray[np.int64], starts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """int64 [n, 2]: byte spans in `text` (UTF-8) of tokens `ids` starting at characters `starts`."""

class TransferTarget:
    """A target vocabulary: byte strings, which ids may take mass, preference among equal bytes, end-of-sequence
    and end-of-turn ids."""

    def __init__(self, tokens: Sequence[bytes], usable: Sequence[bool], rank: Sequence[int], eos: Optional[int] = None, eot: Optional[int] = None) -> None: ...
    def __len__(self) -> int: ...
    def spans(self, text: bytes, ids: npt.NDArray[np.int64], starts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]: ...
    def exact(self, token: bytes) -> Optional[int]: ...

def transfer_texts(
    source: TransferSource,
    target: TransferTarget,
    items: Sequence[tuple],
    out_k: int,
    threads: Optional[int] = None,
    perfect_logp: tuple[float, float] = (0.0, 0.0),
) -> list[tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.int32], Optional[npt.NDArray[np.bool_]], npt.NDArray[np.float32]]]:
    """Per text (target text, source text or None, src ids, src character starts or byte spans [m, 2], tgt ids,
    tgt starts or spans, top-k ids [m, k], log-probs [m, k], true-token log-probs or None, perfect-source seed
    or None), in parallel over texts with the GIL released: (ids [n, out_k], probs [n, out_k], carried [n],
    true-token mass [n], kind [n], source row [n], recalled [n - 1] or None, kept mass [n]: each row's mass
    before its renormalisation, NaN where not carried). Independent of `threads`; ValueError naming the
    text on bad input."""

def remap_spans(src_text: bytes, tgt_text: bytes, spans: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """int64 [m, 2]: byte spans of `src_text` carried into `tgt_text` through difflib's matching blocks."""

def perfect_topk_ids(ids: npt.NDArray[np.int64], k: int, vocab_size: int, seed: int) -> npt.NDArray[np.int64]:
    """int64 [m, k]: the perfect source's top-k ids, drawn exactly as `recall.perfect_source_topk` draws them."""

def align_topk(
    path: npt.NDArray[np.int64],
    src_ids: npt.NDArray[np.int64],
    tgt_ids: npt.NDArray[np.int64],
    vocab_map: npt.NDArray[np.int64],
    src_topk_ids: npt.NDArray[np.int64],
    src_topk_logp: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.int32]]:
    """Per target position: (ids [n, k], probs [n, k], carried [n], source position [n])."""

def codec_train_prior(
    windows: Sequence[tuple],
    k: int,
    step: float,
    threads: Optional[int] = None,
    knee: float = 0.0,
) -> bytes:
    """A shard's codec prior learnt from its windows (the tuples of `codec_encode_windows`): one level
    0..64 per adaptive cell of the coder. Deterministic; ValueError on a bad window."""

def codec_encode_windows(
    windows: Sequence[tuple],
    k: int,
    step: float,
    threads: Optional[int] = None,
    knee: float = 0.0,
    prior: Optional[bytes] = None,
) -> list[tuple[bytes, float, float]]:
    """Per window: (coded bytes, Σ KL, max KL); see rust/src/codec.rs for the format. Every window's
    models start from `prior` (from `codec_train_prior`), or fresh when None; ValueError on a bad prior."""

def codec_decode_windows(
    windows: Sequence[tuple[bytes, int, int, bool]],
    k: int,
    step: float,
    threads: Optional[int] = None,
    knee: float = 0.0,
    prior: Optional[bytes] = None,
) -> list[tuple]:
    """Per (bytes, n tokens, char_start, has_mask): (input ranks, offsets, top-k ranks [n, k], log-probs
    [n, k] float32, CE [n] float32, mask or None). `prior`: the one the windows were encoded with."""
