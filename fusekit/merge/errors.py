"""The merge stage's exception: a merge that cannot be done, saying which tensor or option and what to fix."""


class MergeError(ValueError):
    """Inputs or options that cannot be merged; the message names the tensor/model/option at fault."""
