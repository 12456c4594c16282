"""The merge stage's exception and warning: a merge that cannot be done, saying which tensor or option and
what to fix; a setting fusekit ignores."""


class MergeError(ValueError):
    """Inputs or options that cannot be merged; the message names the tensor/model/option at fault."""


class MergeWarning(UserWarning):
    """A config setting fusekit ignores, as mergekit does (a parameter the method does not read)."""
