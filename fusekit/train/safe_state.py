"""Trainer state (optimizer, scheduler, RNG) as JSON + safetensors: nothing that loading can execute.

`torch.load(weights_only=False)` unpickles, and a crafted pickle runs code. Here a state is split into a
JSON tree of plain values (str, int, float, bool, None, lists, dicts) and a safetensors file of tensors
(numpy arrays ride as tensors, tagged to come back as arrays). Tuples, non-string dict keys, tensors and
arrays are tagged objects in the JSON; anything else is refused when saving, and any other tag when
loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class UnsafeStateError(ValueError):
    """A saved trainer state that is not in fusekit's safe format (or a value that cannot be saved in it)."""


_TAGS = {"__tensor__", "__ndarray__", "__tuple__", "__items__"}


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind == "u" else obj.dtype))
        return {"__ndarray__": [key, obj.dtype.str]}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_flatten(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (set(obj) & _TAGS):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    raise UnsafeStateError(f"cannot save a {type(obj).__name__} in a trainer state (plain values and tensors only)")


def _restore(node: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_restore(x, tensors, where) for x in node]
    if not isinstance(node, dict):
        raise UnsafeStateError(f"{where}: unexpected JSON value {node!r}")
    if len(node) == 1 and next(iter(node)) in _TAGS:
        tag, value = next(iter(node.items()))
        if tag == "__ndarray__":
            key, dtype = value
            if key not in tensors:
                raise UnsafeStateError(f"{where}: tensor {key!r} is missing from the safetensors file")
            return tensors[key].numpy().astype(np.dtype(str(dtype)))
        if tag == "__tensor__":
            if value not in tensors:
                raise UnsafeStateError(f"{where}: tensor {value!r} is missing from the safetensors file")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_restore(x, tensors, where) for x in value)
        return {_restore(k, tensors, where): _restore(v, tensors, where) for k, v in value}
    return {k: _restore(v, tensors, where) for k, v in node.items()}


def save_state(stem: Path, state: Any) -> None:
    """Write `stem`.json and `stem`.safetensors. Raises UnsafeStateError for values other than plain
    ones (None, bool, int, float, str, list, tuple, dict), torch tensors and numpy arrays."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(tree))


def load_state(stem: Path) -> Any:
    """Read what `save_state` wrote; never unpickles. Raises UnsafeStateError for anything else."""
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise UnsafeStateError(f"{stem}: expected {js.name} and {st.name}")
    try:
        tree = json.loads(js.read_text())
        tensors = load_file(str(st))
    except (ValueError, OSError) as exc:
        raise UnsafeStateError(f"{stem}: unreadable trainer state ({exc})") from None
    return _restore(tree, tensors, js)
