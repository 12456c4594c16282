"""Run tracking: every step's metrics and the run's config to TensorBoard, Weights & Biases and MLflow.

`fusekit train --report-to tensorboard,wandb,mlflow` (and `fusekit implicit`, whose stages run through
the same engine). Each back-end is the library's own API: torch's TensorBoard `SummaryWriter`,
`wandb.init(...).log`, MLflow's `MlflowClient.log_batch`. Where they write, with no account needed:

    tensorboard  OUT/tensorboard/           (`tensorboard --logdir OUT/..`)
    wandb        OUT/wandb/offline-run-*/    offline unless WANDB_MODE is set or an API key is known
                                            (then `wandb sync OUT/wandb/offline-run-*` uploads it)
    mlflow       OUT/mlruns (a local file store) unless MLFLOW_TRACKING_URI names another store

metrics.jsonl stays the source of truth: only rank 0 tracks; the back-ends run in one background
thread, so a step only hands its metrics over; a back-end that fails (at start or mid-run) is dropped
with one warning line and the run goes on. A resumed run continues the same W&B / MLflow run (ids in
OUT/tracking.json) and TensorBoard purges the steps after the checkpoint, so every view equals the log.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

BACKENDS = ("tensorboard", "wandb", "mlflow")
EXTRA = "pip install 'fusekit[track]'"
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "tracking.json"


class TrackingError(ValueError):
    """A --report-to value that cannot be used: an unknown back-end, or its library is not installed."""


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """`"tensorboard,wandb"`, a list of names, `"none"` or None → the back-end names, in order.

    Raises TrackingError for a name that is not one of BACKENDS.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise TrackingError(f"unknown --report-to {', '.join(unknown)}: choose from {', '.join(BACKENDS)} (or none)")
    return list(dict.fromkeys(names))


def require(names: Iterable[str]) -> None:
    """Raise TrackingError naming the extra to install for the first back-end whose library is missing."""
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise TrackingError(f"--report-to {name} needs the {_PACKAGE[name]} package, which is not installed: {EXTRA}")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a step (no `step`, no None, no nested figures), as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1} (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Backend(Protocol):
    name: str
    where: str  # for the start line: where its records go

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """torch.utils.tensorboard's SummaryWriter; scalars in double precision (equal to metrics.jsonl)."""

    name = "tensorboard"

    def __init__(self, out: Path, config: dict, start_step: int, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = out / "tensorboard"
        # Every writer opens with a session START: TensorBoard takes a later START at step s as a restart
        # and hides the steps ≥ s an interrupted run had logged (a resumed run logs from start_step + 1).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else 0)
        self.where = str(log_dir)
        if not start_step:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        # One event per step holding every scalar (add_scalar writes one event per scalar).
        parts = [v for key, value in values.items() for v in scalar(key, value, new_style=True, double_precision=True).value]
        self.writer.file_writer.add_summary(Summary(value=parts), step)

    def close(self) -> None:
        self.writer.close()


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbBackend:
    """wandb.init / run.log / run.finish; offline (no account) unless WANDB_MODE or an API key says otherwise."""

    name = "wandb"

    def __init__(self, out: Path, config: dict, start_step: int, state: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_known() else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fusekit"),
            name=os.environ.get("WANDB_NAME", out.name),
            dir=str(out),
            config=config,
            mode=mode,
            id=state.get("id"),
            resume="allow" if state.get("id") else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        state["id"] = self.run.id
        self.where = f"{out / 'wandb'} ({mode})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    """MlflowClient: params at the start, then metrics in log_batch calls of up to `FLUSH_STEPS` steps or
    `FLUSH_SECONDS` of steps (a file store writes one file per metric per call: batching amortises it);
    the rest at close."""

    name = "mlflow"
    FLUSH_STEPS = 50
    FLUSH_SECONDS = 5.0

    def __init__(self, out: Path, config: dict, start_step: int, state: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store behind this switch ("maintenance mode"); it is the store
            # that needs no server and no database, so fusekit opts in for its own default only.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("run_id") if state.get("tracking_uri") == uri else None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fusekit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        state.update(run_id=self.run_id, tracking_uri=uri)
        self.where = uri
        self.pending: list = []
        self.steps, self.flushed = 0, time.monotonic()

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]
        self.steps += 1
        if self.steps >= self.FLUSH_STEPS or time.monotonic() - self.flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self.pending, self.steps, self.flushed = self.pending, [], 0, time.monotonic()
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


_CLASSES = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}


def _warn(message: str) -> None:
    first = (message.strip().splitlines() or [""])[0]
    print(f"warning: {first}", file=sys.stderr, flush=True)


class Tracker:
    """Rank 0's back-ends behind one queue and one worker thread.

    `log(step, metrics)` only enqueues (the step loop does not wait for a library or a network);
    `close()` drains the queue and closes every back-end. A back-end that raises is dropped with one
    warning line; the others and the run go on.
    """

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fusekit-tracking", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._queue.put((step, scalars(metrics)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            step, values = item
            for backend in list(self.backends):
                try:
                    backend.log(step, values)
                except Exception as exc:  # a tracking library's failure must not end the run
                    self.backends.remove(backend)
                    _warn(
                        f"{backend.name} tracking failed at step {step} ({type(exc).__name__}: {exc}); "
                        "it stops, the run goes on (metrics.jsonl has every step)"
                    )

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:
                _warn(
                    f"{backend.name} tracking failed while finishing ({type(exc).__name__}: {exc}); "
                    "the run goes on (metrics.jsonl has every step)"
                )
        self.backends = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullTracker(Tracker):
    """No back-end (the default, and every rank but 0): nothing is queued, no thread runs."""

    def __init__(self) -> None:
        self.backends = []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(report_to: Sequence[str], out: Path, config: dict, start_step: int = 0, enabled: bool = True) -> Tracker:
    """The tracker for a run writing to OUT (from `start_step` when resumed); NullTracker when there is
    nothing to track or this is not rank 0.

    Raises TrackingError when a named back-end's library is missing; a back-end that fails to start is
    skipped with one warning line.
    """
    names = parse_report_to(report_to)
    if not names or not enabled:
        return NullTracker()
    require(names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() and start_step else {}
    backends: list[Backend] = []
    for name in names:
        try:
            backends.append(_CLASSES[name](out, config, start_step, state.setdefault(name, {})))
        except Exception as exc:
            _warn(f"{name} tracking could not start ({type(exc).__name__}: {exc}); the run goes on without it")
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    if backends:
        print("tracking: " + ", ".join(f"{b.name} → {b.where}" for b in backends), file=sys.stderr, flush=True)
    return Tracker(backends)
