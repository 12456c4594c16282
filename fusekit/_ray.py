"""The Ray plumbing every `--ray` stage shares (`fusekit[ray]`): connecting, and fusekit errors out of tasks.

`--ray local` starts a private cluster on this machine; `auto` joins the running one; anything else is
a cluster address (ray://host:10001 or host:6379).
"""

from __future__ import annotations


class RayError(Exception):
    """Ray is missing or the cluster cannot be reached."""


def connect(address: str):
    """The `ray` module, initialised for `address` (left as is when Ray is already initialised)."""
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs the `ray` package: pip install 'fusekit[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayError(
                f"cannot connect to the Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                "or give its address (ray://host:10001 or host:6379), or use --ray local"
            ) from None
    return ray


def get(ray, ref):
    """`ray.get(ref)`, re-raising a fusekit error raised inside the task as itself (its one-line message)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
        if cause is not None and type(cause).__module__.startswith("fusekit"):
            raise cause from None
        raise
