"""The extraction stage's own error type (store problems are `StoreError`, data `CorpusError`)."""


class ExtractError(ValueError):
    """Extraction cannot run as asked: bad options, a model and tokenizer that do not fit, no device."""
