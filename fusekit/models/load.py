"""Loading the model to train or evaluate: an HF folder, a `.gguf` file, or a hub id."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with where fusekit looked."""


@contextmanager
def quiet_transformers():
    """No per-file "Loading weights" / "Writing model shards" bars inside fusekit's own progress."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files from which transformers can build a tokenizer; a model folder without any of them has none.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "tokenizer_config.json",
)


@lru_cache(maxsize=None)
def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the hub at all? (One quick probe per process.)"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects is not in the cache
        return False
    return isinstance(found, str)


def model_ref_problem(model: str | Path, base: Path | None = None) -> str | None:
    """Why `model` (a path that does not exist locally) cannot be a model, or None for a usable hub id.

    A name is taken for a local path, and refused naming it, when it looks like one (starts with . / ~,
    has more than one /, ends in .gguf) or when its first part is an existing local folder (a typo such
    as models/gtp). A hub id must be in the Hugging Face cache or the hub must be reachable (checked with
    one 3 s connection, not ~50 s of download retries).
    """
    from huggingface_hub import constants

    text = str(model)
    p = Path(text).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if p.exists():
        return None
    parent = p.parent
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or p.suffix == ".gguf" or not _HUB_ID.match(text)
    if not looks_local and "/" in text and parent.is_dir():
        looks_local = True
    if looks_local:
        hint = ""
        if parent.is_dir():
            import difflib

            close = difflib.get_close_matches(p.name, sorted(c.name for c in parent.iterdir()), n=1, cutoff=0.5)
            hint = f"; did you mean {parent / close[0]}?" if close else f" ({parent} exists but holds no {p.name})"
        return f"no model at {p}{hint}"
    if _in_hub_cache(text):
        return None
    if constants.HF_HUB_OFFLINE:
        return f"{text} does not exist locally and is not a model in the Hugging Face cache (HF_HUB_OFFLINE is set); check the path"
    if not _hub_reachable(constants.ENDPOINT):
        return f"{text} does not exist locally, is not a cached hub model, and the hub ({constants.ENDPOINT}) cannot be reached; check the path"
    return None


def split_model_ref(model: str | Path) -> tuple[str, dict]:
    """(where transformers should look, extra from_pretrained kwargs) for a folder, a .gguf file or a hub id.

    Raises ModelLoadError naming the path when a local reference is not a model."""
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(model_ref_problem(model) or f"no GGUF file at {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a model folder (no config.json); give a saved model folder or a .gguf")
        return str(p), {}
    problem = model_ref_problem(model)
    if problem:
        raise ModelLoadError(problem)
    return str(model), {}  # a hub id


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer (a folder's tokenizer files, the .gguf's vocabulary, the hub's, or a bare
    tokenizer.json file / tokenizer-only folder).

    Raises ModelLoadError naming the model when it has no tokenizer files or they cannot be read.
    """
    from transformers import AutoTokenizer

    tokenizer_only = _tokenizer_only(model)
    if tokenizer_only is not None:
        return tokenizer_only
    where, extra = split_model_ref(model)
    folder = Path(where)
    if not extra and folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, …): save the tokenizer "
            "into the model folder (tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelLoadError(f"cannot load a tokenizer from {model}: {first}") from None


def _tokenizer_only(model: str | Path):
    """A tokenizer given without its model — a tokenizer.json file, or a folder of tokenizer files and no
    config.json (enough for `prepare` and `align-text`); None for anything else."""
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "tokenizer.json").is_file():
        if (p / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(str(p))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ModelLoadError(f"cannot load the tokenizer in {p}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    elif not (p.is_file() and p.suffix == ".json"):
        return None
    from transformers import PreTrainedTokenizerFast

    from fusekit.models.tokenizer_file import TokenizerNotFound, load_tokenizer as load_tokenizer_file

    try:  # the one reader of bare tokenizer.json files (align-text uses it too)
        return PreTrainedTokenizerFast(tokenizer_object=load_tokenizer_file(p))
    except TokenizerNotFound as exc:
        raise ModelLoadError(str(exc)) from None


def require_fast_tokenizer(tokenizer, model: str | Path):
    """`tokenizer` when it has a fast (Rust `tokenizers`) backend; else ModelLoadError naming `model`.

    fusekit needs the fast backend for character offsets and the normalised vocabulary.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelLoadError(
            f"the tokenizer of {model} ({type(tokenizer).__name__}) has no fast backend; fusekit needs one for "
            "character offsets: save the model with a tokenizer.json (AutoTokenizer.from_pretrained(..., "
            "use_fast=True).save_pretrained(folder))"
        )
    return tokenizer


def load_model(model: str | Path, dtype=None, trust_remote_code: bool = False):
    """A causal LM in `dtype` (fp32 by default: the master weights), ready for `save_pretrained`.

    A GGUF-loaded model refuses `save_pretrained`, so its (dequantised) weights are moved into a model
    built from the same config.
    """
    from transformers import AutoModelForCausalLM

    loaded, gguf = _from_pretrained(model, dtype, trust_remote_code)
    if not gguf:
        return loaded
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=loaded.dtype, trust_remote_code=trust_remote_code)
    plain.load_state_dict(loaded.state_dict())
    return plain


def load_weights(model: str | Path, dtype=None, trust_remote_code: bool = False):
    """(config, state dict) of the causal LM `load_model` would return — the same tensors — without
    rebuilding a GGUF-loaded model into a savable one (which would hold the weights twice)."""
    loaded, _ = _from_pretrained(model, dtype, trust_remote_code)
    return loaded.config, loaded.state_dict()


def _from_pretrained(model: str | Path, dtype, trust_remote_code: bool):
    """(the model as `from_pretrained` loads it in `dtype`, whether it came from a GGUF file); a GGUF
    model's config loses its quantization_config, since its weights are dequantised."""
    import torch
    from transformers import AutoModelForCausalLM

    where, extra = split_model_ref(model)
    try:
        with quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a model from {model}: {exc}") from None
    gguf = "gguf_file" in extra
    if gguf and hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    return loaded, gguf


def load_config(model: str | Path, trust_remote_code: bool):
    """The model's transformers config (no weights read); ModelLoadError when it cannot be read."""
    from transformers import AutoConfig

    where, extra = split_model_ref(model)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read the model config of {model}: {str(exc).splitlines()[0]}") from None


def parameter_count(model: str | Path, trust_remote_code: bool = False) -> int:
    """The model's parameters from its config alone: built on the meta device, so nothing is allocated
    (tied embeddings count once). A GGUF's dequantised config is built as the plain model it loads as."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model, trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"), quiet_transformers():
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in net.parameters())
