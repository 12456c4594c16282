"""A `transformers` fast tokenizer from a GGUF file's vocabulary, cached on disk.

transformers builds a fast tokenizer from most GGUF files itself (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`, see https://huggingface.co/docs/transformers/gguf). It refuses the architectures `mpt` and
`gptneox` ("architecture not supported"), whose models both use the GPT-NeoX-20B tokenizer (Black et al.,
2022, https://arxiv.org/abs/2204.06745): for those we build the byte-level BPE from the file's
`tokenizer.ggml.*` fields, the way the model's own `tokenizer.json` describes it (NFC normaliser, GPT-2
byte-level pre-tokeniser without a prefix space, byte-level decoder, `<|endoftext|>` as bos/eos/unk).

Fixes to what transformers builds, each checked by llama.cpp's `.inp`/`.out` fixtures (whose ids come
from the models' own Hugging Face tokenizers), see `tests/models/test_gguf_tokenizer.py`:
- SentencePiece (`llama`) vocabularies always get the `▁` dummy prefix (`_sentencepiece_dummy_prefix`).
- `tokenizer.ggml.pre` values transformers has no split for get their models' pre-tokenisers
  (`falcon`, `starcoder`, `deepseek-llm`: `_PRE_TOKENIZERS`), and Llama-3 its `ignore_merges` BPE.
- ids follow the file: tokens transformers appends beyond the file's entries (a default
  `<|endoftext|>` for Llama-3, re-spelled copies of DeepSeek's `<｜begin▁of▁sentence｜>`) are dropped or
  pointed back at the file's own id (`_fit_ids_to_file`).

Padded vocabularies: `len(tokenizer)` is always the file's entry count, i.e. the model's embedding rows.
GPT-NeoX/MPT files hold 50,432 entries where the real tokenizer has 50,277: ids 0..50253 are BPE pieces
(0 `<|endoftext|>` and 1 `<|padding|>` special), 50254..50276 added whitespace-run tokens ("  " to 24
spaces, matched before BPE as in the real tokenizer), and 50277..50431 `[PAD<id>]` placeholders that
llama.cpp's converter wrote for unused embedding rows. The placeholders are kept as plain (non-special)
added tokens -- as transformers does for Qwen2's 271 `[PAD151665]`.. entries -- so logits columns and
token ids line up one to one; no ordinary text produces them (only the literal string `[PAD50300]`
would, as in llama.cpp).

Building from the 128k/152k-entry files takes 10-25 s, so the built tokenizer is saved with
`save_pretrained` under a cache folder keyed by the file's sha256 and loaded from there next time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusekit.models.gguf_fields import GGUFTokenizerError, read_fields

# GGUF token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_NEOX_ARCHITECTURES = ("mpt", "gptneox")
_PAD_PLACEHOLDER = re.compile(r"\[PAD(\d+)\]")
# Bump when the way a tokenizer is built changes, so stale cache entries are not reused.
_CACHE_FORMAT = "4"


def cache_root() -> Path:
    """fusekit's cache folder: $FUSEKIT_CACHE, else $XDG_CACHE_HOME/fusekit, else ~/.cache/fusekit."""
    root = os.environ.get("FUSEKIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "fusekit"


def default_cache_dir() -> Path:
    """$FUSEKIT_CACHE/tokenizers, else $XDG_CACHE_HOME/fusekit/tokenizers, else ~/.cache/fusekit/tokenizers."""
    return cache_root() / "tokenizers"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf_tokenizer(path: str | Path, cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer stored in a GGUF file (a vocabulary-only file or a whole model).

    `cache_dir` (default `default_cache_dir()`) keeps one `save_pretrained` folder per file, named by
    the file's sha256; a later call with the same file content loads that folder (0.1-3 s) instead of
    rebuilding (2-30 s). Entries are written to a temporary folder and renamed into place, so a crash
    never leaves a half-written entry; the first call also returns the tokenizer read back from the
    cache, so first and later calls give the same object.

    Ids are the file's: `len(tokenizer)` equals the number of entries in `tokenizer.ggml.tokens`
    (`gguf_fields.gguf_vocab_size`, the model's embedding rows), padding placeholders included (see module doc).

    Supported: whatever transformers' GGUF loader supports (Llama SentencePiece, GPT-2, Llama-3, Qwen2,
    Falcon, StarCoder, DeepSeek, Phi-3, ...) with the fixes the module docstring lists, plus `mpt` and
    `gptneox` built here.

    Raises `FileNotFoundError` when `path` is not a file and `GGUFTokenizerError` when the file has no
    vocabulary transformers or this module can read.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no GGUF file at {p}: pass the path of a .gguf file")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"{file_sha256(p)}-v{_CACHE_FORMAT}"
    if not (entry / "tokenizer.json").is_file():
        fields = read_fields(p)
        if "tokenizer.ggml.tokens" not in fields:
            raise GGUFTokenizerError(f"{p} has no tokenizer.ggml.tokens: it holds no vocabulary")
        tokenizer = _build(p, fields)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            tokenizer.save_pretrained(str(tmp))
            _fit_ids_to_file(tmp, fields["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
            try:
                tmp.rename(entry)
            except OSError:  # another process cached the same file meanwhile: keep theirs
                if not (entry / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(entry))


def _split(pattern: str) -> object:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _falcon_pre_tokenizer() -> object:
    """Falcon's tokenizer.json: punctuation runs, GPT-2 byte-level regex, then digits in threes."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation(behavior="contiguous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            pre_tokenizers.Digits(individual_digits=False),
            _split("[0-9][0-9][0-9]"),
        ]
    )


def _starcoder_pre_tokenizer() -> object:
    """StarCoder's split: every numeric character (`\\p{N}`, so `½` too) on its own, then GPT-2 byte-level."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            _split("\\p{N}"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


# DeepSeek-LLM's letter class (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, ... letters), as in
# its tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM.
_DEEPSEEK_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-"
    "ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ\U00010400-\U0001044f𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)


def _deepseek_llm_pre_tokenizer() -> object:
    """DeepSeek-LLM's tokenizer.json: newline, letter, punctuation, trailing-space, CJK and number splits."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            _split(r"[\r\n]"),
            _split(f"\\s?[{_DEEPSEEK_LETTERS}]+"),
            _split("\\s?[!-/:-~！-／：-～‘-‟　-。]+"),
            _split("\\s+$"),
            _split("[一-龥ࠀ-一가-퟿]+"),
            _split("\\p{N}+"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


# `tokenizer.ggml.pre` values whose split transformers' GGUF loader does not know (it falls back to the
# GPT-2 regex, which keeps `" ½"` or `"3333"` in one piece where these models do not).
_PRE_TOKENIZERS = {
    "falcon": _falcon_pre_tokenizer,
    "starcoder": _starcoder_pre_tokenizer,
    "deepseek-llm": _deepseek_llm_pre_tokenizer,
}
# Llama-3's BPE takes a whole pre-token found in the vocabulary before merging (`ignore_merges` in its
# tokenizer.json; llama.cpp does the same): `" Việt"` is one token there, unreachable by merges.
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})


def _fit_ids_to_file(folder: Path, file_tokens: list[str]) -> None:
    """Make a saved tokenizer's ids the file's and its `tokenizer.json` the one that is loaded back.

    An added token with an id >= len(file_tokens) whose text is a file entry gets that entry's id (DeepSeek's
    `<｜begin▁of▁sentence｜>`, which transformers re-spelled in the BPE vocabulary and appended again), and
    the vocabulary entry at that id gets the added token's text back; any other is dropped (Llama-3's
    default `<|endoftext|>`), and special-token settings naming it are cleared. `tokenizer_class` becomes
    the generic `TokenizersBackend`: model classes such as `GPT2Tokenizer` rebuild their own
    pre-tokeniser on load and would undo the fixes. Rewrites the JSON files in `folder`.
    """
    import json

    n = len(file_tokens)
    tok_path = folder / "tokenizer.json"
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    added = data.get("added_tokens", [])
    index: dict[str, int] = {}
    for i, t in enumerate(file_tokens):
        index.setdefault(t, i)
    taken = {a["id"] for a in added if a["id"] < n}
    remap: dict[int, int] = {}
    dropped: set[str] = set()
    kept = []
    for a in added:
        if a["id"] < n:
            kept.append(a)
            continue
        home = index.get(a["content"])
        if home is None or home in taken:
            dropped.add(a["content"])
            continue
        remap[a["id"]] = home
        taken.add(home)
        kept.append(dict(a, id=home))
    data["added_tokens"] = sorted(kept, key=lambda a: a["id"])
    data["post_processor"] = _remap_ids(data.get("post_processor"), remap)
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        by_id = {i: t for t, i in vocab.items()}
        for a in data["added_tokens"]:
            old = by_id.get(a["id"])
            if old is not None and old != a["content"] and a["content"] not in vocab:
                vocab[a["content"]] = vocab.pop(old)
    tok_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = cfg.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if content in dropped:
            cfg[key] = None
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _remap_ids(node: object, remap: dict[int, int]) -> object:
    """`node` (a post-processor's JSON) with every id list's entries mapped through `remap`."""
    if isinstance(node, dict):
        return {
            k: [remap.get(i, i) for i in v] if k == "ids" and isinstance(v, list) else _remap_ids(v, remap)
            for k, v in node.items()
        }
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):  # ("</s>", 2) pairs
            return [node[0], remap.get(node[1], node[1])]
        return [_remap_ids(v, remap) for v in node]
    return node


def _build(path: Path, fields: dict[str, object]) -> PreTrainedTokenizerFast:
    arch = fields.get("general.architecture")
    if arch in _NEOX_ARCHITECTURES:
        return _build_neox(path, fields)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise GGUFTokenizerError(f"cannot build a tokenizer from {path} (architecture {arch!r}): {exc}") from exc
    if fields.get("tokenizer.ggml.model") == "llama" and fields.get("tokenizer.ggml.add_space_prefix", True):
        _sentencepiece_dummy_prefix(tokenizer)
    pre = fields.get("tokenizer.ggml.pre")
    if pre in _PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()  # type: ignore[index]
    if pre in _IGNORE_MERGES:
        tokenizer.backend_tokenizer.model.ignore_merges = True
    return tokenizer


def _sentencepiece_dummy_prefix(tokenizer: PreTrainedTokenizerFast) -> None:
    """Prefix every text with `▁`, as SentencePiece's `add_dummy_prefix` (and llama.cpp) do.

    transformers builds a `llama`-architecture SentencePiece vocabulary with a `Metaspace(prepend_scheme=
    "first")` pre-tokeniser, which adds no `▁` when the text already starts with a space: `" Hello"` becomes
    `▁Hello` (15043) instead of `▁▁Hello` (29871 15043). Llama-2's and Mistral's own `tokenizer.json`
    (legacy SentencePiece conversion) and llama.cpp prepend unconditionally; this is the normaliser they
    use (transformers already uses it for Phi-3). Only texts starting with a space tokenise differently.
    """
    from tokenizers import normalizers, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        return
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")]
    )
    backend.pre_tokenizer = None


def _build_neox(path: Path, fields: dict[str, object]) -> PreTrainedTokenizerFast:
    """The GPT-NeoX-20B byte-level BPE (as in EleutherAI/gpt-neox-20b's tokenizer.json) from GGUF fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFTokenizerError(
            f"{path}: tokenizer.ggml.model is {fields.get('tokenizer.ggml.model')!r}, expected 'gpt2' (byte-level BPE)"
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]  # type: ignore[assignment]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)  # type: ignore[assignment]
    merges: list[str] = fields["tokenizer.ggml.merges"]  # type: ignore[assignment]

    n = len(tokens)
    # BPE pieces: every entry before the first user-defined one; user-defined ones are added tokens after.
    n_bpe = next((i for i, t in enumerate(types) if t == _USER_DEFINED), n)
    if any(t != _USER_DEFINED for t in types[n_bpe:]):
        raise GGUFTokenizerError(f"{path}: user-defined tokens are not all after the BPE pieces; cannot keep their ids")

    vocab = {tok: i for i, tok in enumerate(tokens[:n_bpe])}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in range(n_bpe) if types[i] == _CONTROL]
    )
    # Whitespace runs are normalised added tokens as in the model's tokenizer.json; `[PAD<id>]`
    # placeholders are kept (unnormalised, not special) so ids and `len()` match the file and the model.
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=_PAD_PLACEHOLDER.fullmatch(t) is None)
            for t in tokens[n_bpe:]
        ]
    )
    for i, t in enumerate(tokens):
        if tok.token_to_id(t) != i:
            raise GGUFTokenizerError(f"{path}: token {t!r} got id {tok.token_to_id(t)} instead of {i}")

    def special(key: str) -> str | None:
        idx = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < n else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
