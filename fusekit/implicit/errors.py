"""The implicit-fusion stages' error type."""


class ImplicitError(ValueError):
    """Input or a work folder that implicit fusion cannot use, with what to do about it."""
