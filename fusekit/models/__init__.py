"""Loading models and tokenizers, and describing them: below every stage.

`load_model` / `load_tokenizer` take an HF folder, a `.gguf` file or a hub id (`load`); a bare
`tokenizer.json` or a vocabulary-only GGUF loads with `tokenizer_file.load_tokenizer` (`gguf_tokenizer`
builds a GGUF's fast tokenizer from the metadata `gguf_fields` reads); `identity` holds
the fingerprints and sizes stores record; `device` picks device and dtype; `packing` puts several
windows in one row for models that keep attention inside each (`packing_supported`); `head` runs a
model without its output layer, so extraction and training apply it a chunk at a time (`head_usable`).
"""

from fusekit.models.load import ModelLoadError, load_model, load_tokenizer

__all__ = ["ModelLoadError", "load_model", "load_tokenizer"]
