"""The previous release's spellings of the public API, kept working for one release with a warning.

Before `fusekit.run_<stage>` (fusekit/api.py), `fusekit.extract`, `fusekit.train` and `fusekit.merge` were
packages whose module class was swapped so they could be called. The swap stays for this release only,
and each call warns (DeprecationWarning) naming the new function; the other old names
(`fusekit.align_store`, `fusekit.evaluate`, `fusekit.implicit_fusion`) are wrapped by `deprecated`.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from typing import Callable


def deprecated(old: str, new: str, fn: Callable) -> Callable:
    """`fn` under its previous-release spelling `old`: same behaviour and return, plus a DeprecationWarning."""

    def wrapper(*args, **kwargs):
        warnings.warn(f"{old} is deprecated and goes in the next release: use {new}", DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = old.rpartition(".")[2]
    wrapper.__doc__ = f"Deprecated: use {new}.\n\n{fn.__doc__ or ''}"
    wrapper.__wrapped__ = fn  # inspect.signature shows the real parameters
    return wrapper


def make_module_callable(module_name: str, fn: Callable, new: str) -> None:
    """Let `fusekit.<stage>(...)` (the package called) keep working for one release, warning to use `new`."""
    module = sys.modules[module_name]
    message = f"calling the {module_name} package is deprecated and goes in the next release: use {new}"

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            # stacklevel 2 is the caller's line: Python shows a DeprecationWarning raised from __main__ by default.
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)

    _CallableModule.__call__.__doc__ = f"Deprecated: {message}.\n\n{fn.__doc__ or ''}"
    module.__class__ = _CallableModule
    module.__signature__ = inspect.signature(fn)  # what inspect.signature(fusekit.<stage>) shows
