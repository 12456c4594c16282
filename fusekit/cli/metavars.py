"""What an option takes, shown in `--help` instead of Typer's `<str>`: the values of a typed config's
Literal field, read from the config so the two cannot drift apart."""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel


def one_of(config: type[BaseModel], field: str) -> str:
    """`[a|b|c]` for a field typed `Literal["a", "b", "c"]` (or a list of one). Raises TypeError for a
    field of any other type (a metavar listing nothing would be wrong)."""
    kind = config.model_fields[field].annotation
    if get_origin(kind) is list:
        (kind,) = get_args(kind)
    if get_origin(kind) is not Literal:
        raise TypeError(f"{config.__name__}.{field} is not a Literal field: {kind!r}")
    return "[" + "|".join(str(v) for v in get_args(kind)) + "]"
