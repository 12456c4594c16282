"""load_gguf_tokenizer against llama.cpp's tokenizer fixtures beside the real GGUF vocabularies.

Each `ggml-vocab-X.gguf.inp` holds texts separated by `\\n__ggml_vocab_test__\\n` lines and `.out` the
token ids of each text, one line per text, as written by llama.cpp's convert_hf_to_gguf_update.py from
the model's own Hugging Face tokenizer. llama.cpp's tests/test-tokenizer-0.cpp reads them the same way
(split on the separator, no stripping of the texts, ids split on spaces) and tokenises with
add_special=false, parse_special=false: no BOS/EOS, so we encode with add_special_tokens=False.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from real_tokenizers import NAMES, shared_tokenizers_dir

SEP = "\n__ggml_vocab_test__\n"
FOLDER = shared_tokenizers_dir()
# gpt-neox has no fixture of its own; MPT-7B uses the GPT-NeoX-20B tokenizer, so MPT's applies
# (test_neox_and_mpt_files_hold_one_vocabulary checks that premise).
FIXTURE_OF = {name: name for name in NAMES} | {"gpt-neox": "mpt"}

pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(), reason=f"real tokenizers not available: {FOLDER} is absent (set FUSEKIT_SHARED_TOKENIZERS)"
)


def read_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    raw = Path(f"{gguf}.inp").read_text(encoding="utf-8")
    texts = raw.split(SEP)
    if texts and texts[-1] == "":  # the file ends with a separator: nothing after it
        texts.pop()
    outs = Path(f"{gguf}.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(outs), f"{gguf}: {len(texts)} texts but {len(outs)} id lines"
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def fixture_names() -> list[str]:
    if not FOLDER.is_dir():
        return list(NAMES)
    return [n for n in NAMES if Path(f"{FOLDER}/ggml-vocab-{FIXTURE_OF[n]}.gguf.inp").is_file()]


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-tokenizers")


@pytest.fixture(scope="session")
def loaded():
    """real_tokenizer: built once per process into a cache shared with other test modules."""
    from real_tokenizers import real_tokenizer

    return real_tokenizer


@pytest.mark.parametrize("name", fixture_names())
def test_matches_llama_cpp_fixture(name, loaded):
    tok = loaded(name)
    cases = read_cases(FOLDER / f"ggml-vocab-{FIXTURE_OF[name]}.gguf")
    assert len(cases) == 46
    wrong = [
        (text, expected, got)
        for text, expected in cases
        if (got := tok.encode(text, add_special_tokens=False)) != expected
    ]
    assert not wrong, f"{name}: {len(wrong)}/{len(cases)} texts differ, first: {wrong[0]!r}"


@pytest.mark.parametrize("name", fixture_names())
def test_ids_follow_the_file(name, loaded):
    """len() is the file's entry count; bos/eos are the file's ids; the largest id is the last entry."""
    from fusekit.models.gguf_fields import read_fields as _read_fields

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    fields = _read_fields(FOLDER / f"ggml-vocab-{name}.gguf", keys)
    tok = loaded(name)
    assert len(tok) == len(fields["tokenizer.ggml.tokens"])
    assert max(tok.get_vocab().values()) == len(tok) - 1
    if "tokenizer.ggml.bos_token_id" in fields:
        assert tok.bos_token_id == fields["tokenizer.ggml.bos_token_id"]
    assert tok.eos_token_id == fields["tokenizer.ggml.eos_token_id"]


def test_neox_and_mpt_files_hold_one_vocabulary():
    from fusekit.models.gguf_fields import read_fields as _read_fields

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    neox = _read_fields(FOLDER / "ggml-vocab-gpt-neox.gguf", keys)
    mpt = _read_fields(FOLDER / "ggml-vocab-mpt.gguf", keys)
    assert neox == mpt


def test_neox_layout(loaded):
    """Hand-checked facts of the GPT-NeoX-20B tokenizer (EleutherAI/gpt-neox-20b tokenizer.json)."""
    tok = loaded("gpt-neox")
    assert len(tok) == 50432  # padded to the model's embedding rows
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|endoftext|>",) * 3
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [0]
    # Added whitespace runs: 24 spaces is id 50254, two spaces 50276, matched before BPE.
    assert tok.encode(" " * 24, add_special_tokens=False) == [50254]
    assert tok.encode("a" + " " * 2 + "b", add_special_tokens=False)[1] == 50276
    assert tok.convert_ids_to_tokens(50431) == "[PAD50431]"
    # No prefix space, byte-level round trip.
    text = "Hello world\n\tüñí 🦙"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[0]) == "Hello"
    assert tok.decode(ids) == text


def test_cache_is_reused(tok_cache):
    from fusekit.models.gguf_tokenizer import file_sha256, load_gguf_tokenizer

    path = FOLDER / "ggml-vocab-phi-3.gguf"
    load_gguf_tokenizer(path, cache_dir=tok_cache)
    entries = [p for p in tok_cache.iterdir() if p.name.startswith(file_sha256(path))]
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    stamp = (entries[0] / "tokenizer.json").stat().st_mtime_ns
    again = load_gguf_tokenizer(path, cache_dir=tok_cache)
    assert (entries[0] / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.encode(" Hello", add_special_tokens=False) == [29871, 15043]
    assert not [p for p in tok_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bad_path_is_a_clear_error(tmp_path):
    from fusekit.models.gguf_tokenizer import load_gguf_tokenizer

    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf_tokenizer(tmp_path / "missing.gguf", cache_dir=tmp_path)


def test_real_tokenizer_helper(tmp_path, monkeypatch):
    import real_tokenizers

    with pytest.raises(ValueError, match="unknown real tokenizer"):
        real_tokenizers.real_tokenizer("nope")
    monkeypatch.setenv("FUSEKIT_SHARED_TOKENIZERS", str(tmp_path / "absent"))
    with pytest.raises(pytest.skip.Exception, match="absent"):
        real_tokenizers.real_tokenizer("qwen2")


def test_both_metadata_readers_agree():
    """The fast metadata reader (transformers') and the fallback (gguf.GGUFReader) read the same fields."""
    from fusekit.models.gguf_fields import read_fields as _read_fields, read_fields_gguf as _read_fields_gguf

    path = FOLDER / "ggml-vocab-llama-spm.gguf"
    fast = _read_fields(path)
    assert len(fast["tokenizer.ggml.tokens"]) == 32000
    assert fast == _read_fields_gguf(path)


def test_file_without_vocabulary_is_a_clear_error(tmp_path):
    """A GGUF file holding only `general.architecture` (written by hand: magic, v3, 0 tensors, 1 key)."""
    import struct

    from fusekit.models.gguf_tokenizer import GGUFTokenizerError, load_gguf_tokenizer

    key, value = b"general.architecture", b"llama"
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    blob += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    path = tmp_path / "empty.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFTokenizerError, match="no tokenizer.ggml.tokens"):
        load_gguf_tokenizer(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
