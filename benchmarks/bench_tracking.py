"""What `--report-to` costs: the demo's fusion training with and without TensorBoard + W&B + MLflow.

    python benchmarks/bench_tracking.py [--demo fusekit-demo] [--steps 60] [--repeat 2] [--each]

Trains the demo's target (FuseLLM-MinCE, the demo's options) on the demo's aligned store, alternating
runs without tracking and with all three back-ends (W&B offline, MLflow's local file store), `--repeat`
times each. Two figures per configuration, best of the repeats:

- wall ms/step: the training loop's time per step (tokens / the run's tokens/s, as `fusekit train`
  reports it; trackers' start-up and closing excluded) — what a user waits, but on a shared machine
  other load moves it by more than the effect;
- CPU ms/step: CPU time of the process (every thread: the tracking thread included) and of its child
  processes (W&B's service), for `--steps` steps minus a run of `--base` steps (start-up cancels) —
  the work tracking adds, robust to other load; on an idle machine with a spare core it overstates the
  wall cost.

Prints the ratios tracked / untracked; the goal is ≤ 1.02. `--each` adds one row per back-end. The
demo (`fusekit demo --quick` when --demo holds none) is run first if needed. Set OMP_NUM_THREADS=1 on a
shared machine (torch's threads spin under contention and blur CPU time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import print_table


def demo_inputs(folder: Path, quick: bool) -> tuple[Path, Path, dict]:
    """(target model, aligned store, the demo's config) — running the demo first when it is not there."""
    results = folder / "results.json"
    if not results.is_file():
        from fusekit.demo.run import run_demo

        print(f"running the demo into {folder} first …", file=sys.stderr, flush=True)
        run_demo(folder, quick=quick, progress=False)
    cfg = json.loads(results.read_text())["config"]
    return folder / "models" / "target", folder / "run" / "aligned", cfg


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children, alive (W&B's service) or ended."""
    import resource

    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF)
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    alive = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            alive += t.user + t.system
        except psutil.Error:
            pass
    return own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime + alive


def step_seconds(out: Path) -> float:
    from fusekit.train.engine import read_metrics

    run = json.loads((out / "fusekit_train.json").read_text())["final"]["run"]
    tokens = sum(r["tokens"] for r in read_metrics(out))
    return tokens / run["tokens_per_s"] / run["steps"]


def backend_costs(folder: Path, steps: int = 300) -> list[list]:
    """CPU per logged step of each back-end alone (this process and W&B's service), a demo metrics line
    logged `steps` times, start-up excluded and closing included: the work tracking adds to a step."""
    from fusekit.train.tracking import MlflowBackend, TensorBoardBackend, WandbBackend

    line = {"loss": 6.1, "clm": 6.2, "fusion": 5.9, "lam": 0.9, "lr": 1e-3, "grad_norm": 0.8, "tokens": 2048,
            "tokens_per_s": 9000.0, "elapsed_s": 12.0, "peak_memory_mib": 900.0}
    rows = []
    for cls in (TensorBoardBackend, MlflowBackend, WandbBackend):
        backend = cls(folder / cls.name, {"bench": True}, 0, {})
        backend.log(0, line)
        before = cpu_seconds()
        for step in range(1, steps + 1):
            backend.log(step, line)
        backend.close()
        rows.append([cls.name, (cpu_seconds() - before) / steps * 1e3])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("fusekit-demo"), help="A demo output folder (made with --quick if missing).")
    parser.add_argument("--full", action="store_true", help="Make the full demo (not --quick) when --demo holds none.")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--base", type=int, default=10, help="Steps of the run whose CPU time is subtracted (start-up).")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--each", action="store_true", help="Also time each back-end alone.")
    parser.add_argument("--out", type=Path, default=Path("bench-tracking"))
    parser.add_argument("--backends-only", action="store_true", help="Only the per-back-end CPU per step (no training).")
    args = parser.parse_args()

    costs = backend_costs(args.out / "backends")
    costs.append(["all three", sum(c[1] for c in costs)])
    print_table("CPU per logged step, each back-end alone (this process + W&B's service)", ["back-end", "CPU ms / step"], costs)
    if args.backends_only:
        return

    import fusekit

    target, aligned, cfg = demo_inputs(args.demo, quick=not args.full)
    configs = {"none": []}
    if args.each:
        configs.update({name: [name] for name in ("tensorboard", "wandb", "mlflow")})
    configs["all three"] = ["tensorboard", "wandb", "mlflow"]
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}

    def train(name: str, report_to: list[str], steps: int, tag: str) -> tuple[Path, float]:
        out = args.out / f"{name.replace(' ', '-')}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        before = cpu_seconds()
        fusekit.run_train(
            target, aligned, out, fusion="min_ce", lam=cfg["lam"], lr=cfg["fusion_lr"], batch_size=cfg["batch_size"],
            max_length=cfg["window"], warmup_ratio=0.05, seed=cfg["seed"], max_steps=steps,
            report_to=report_to, progress=False,
        ).out
        return out, cpu_seconds() - before

    for name, report_to in configs.items():  # warm-up: first-use imports (torch paths, each library) are not the steps' cost
        train(name, report_to, 2, "warm-up")
    for r in range(args.repeat):
        for name, report_to in configs.items():  # interleaved, so load on the machine hits every config alike
            out, long_cpu = train(name, report_to, args.steps, f"{r}")
            _, short_cpu = train(name, report_to, args.base, f"{r}-base")
            times[name].append(step_seconds(out))
            cpu[name].append((long_cpu - short_cpu) / (args.steps - args.base))
            print(f"{name} run {r}: wall {times[name][-1] * 1e3:.1f} ms/step, CPU {cpu[name][-1] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    wall0, cpu0 = min(times["none"]), min(cpu["none"])
    rows = [[name, min(times[name]) * 1e3, min(times[name]) / wall0, min(cpu[name]) * 1e3, min(cpu[name]) / cpu0] for name in configs]
    print_table(
        f"tracking cost on the demo's fusion training ({args.steps} steps, batch {cfg['batch_size']}×{cfg['window']}, best of {args.repeat})",
        ["report_to", "wall ms / step", "wall ratio", "CPU ms / step", "CPU ratio"], rows,
    )
    print(f"all three / none: wall {min(times['all three']) / wall0:.4f}, CPU {min(cpu['all three']) / cpu0:.4f} (goal ≤ 1.02)")
    print(f"back-ends' own CPU / untracked step CPU: {costs[-1][1] / (cpu0 * 1e3):.4f} ({costs[-1][1]:.2f} ms of {cpu0 * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
