"""The stores' one error type, below every store module so each can raise it."""


class StoreError(Exception):
    """A store that cannot be used as asked: mismatched settings, a corrupt or foreign shard, a full disk."""
