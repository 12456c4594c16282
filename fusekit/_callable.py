"""Let a stage's package be called like its main function.

`fusekit.extract` is both a package (fusekit/extract/) and the function users call
(`fusekit.extract(model, data, out)`). Importing the package binds the attribute `fusekit.extract` to
the module, whatever fusekit/__init__ says; giving the module a `__call__` makes both spellings work.
"""

from __future__ import annotations

import sys
import types
from typing import Callable


def make_module_callable(module_name: str, fn: Callable) -> None:
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    _CallableModule.__call__.__doc__ = fn.__doc__
    module.__class__ = _CallableModule
