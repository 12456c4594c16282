"""What `--report-to` costs: the demo's fusion training with and without TensorBoard + W&B + MLflow.

    python benchmarks/bench_tracking.py [--demo fusekit-demo] [--steps 40] [--repeat 3] [--each]

Trains the demo's target (FuseLLM-MinCE, the demo's options) on the demo's aligned store for `--steps`
steps, alternating runs without tracking and with all three back-ends (W&B offline, MLflow's local file
store), `--repeat` times each; the figure is the training loop's time per step (tokens / the run's
tokens/s: start-up and closing of the trackers excluded, as `fusekit train` reports it), best of the
repeats. Prints the ratio tracked / untracked; the goal is ≤ 1.02. `--each` adds one row per back-end.
The demo (`fusekit demo --quick` when --demo holds none) is run first if needed.
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


def step_seconds(out: Path) -> float:
    from fusekit.train.engine import read_metrics

    run = json.loads((out / "fusekit_train.json").read_text())["final"]["run"]
    tokens = sum(r["tokens"] for r in read_metrics(out))
    return tokens / run["tokens_per_s"] / run["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("fusekit-demo"), help="A demo output folder (made with --quick if missing).")
    parser.add_argument("--full", action="store_true", help="Make the full demo (not --quick) when --demo holds none.")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--each", action="store_true", help="Also time each back-end alone.")
    parser.add_argument("--out", type=Path, default=Path("bench-tracking"))
    args = parser.parse_args()

    import fusekit

    target, aligned, cfg = demo_inputs(args.demo, quick=not args.full)
    configs = {"none": []}
    if args.each:
        configs.update({name: [name] for name in ("tensorboard", "wandb", "mlflow")})
    configs["all three"] = ["tensorboard", "wandb", "mlflow"]
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeat):
        for name, report_to in configs.items():  # interleaved, so load on the machine hits every config alike
            out = args.out / f"{name.replace(' ', '-')}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            fusekit.train(
                target, aligned, out, fusion="min_ce", lam=cfg["lam"], lr=cfg["fusion_lr"], batch_size=cfg["batch_size"],
                max_length=cfg["window"], warmup_ratio=0.05, seed=cfg["seed"], max_steps=args.steps,
                report_to=report_to, progress=False,
            )
            times[name].append(step_seconds(out))
            print(f"{name} run {r}: {times[name][-1] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    base = min(times["none"])
    rows = [[name, min(t) * 1e3, min(t) / base] for name, t in times.items()]
    print_table(
        f"tracking cost on the demo's fusion training ({args.steps} steps, batch {cfg['batch_size']}×{cfg['window']}, best of {args.repeat})",
        ["report_to", "ms / step", "ratio to none"], rows,
    )
    print(f"ratio all three / none = {min(times['all three']) / base:.4f} (goal ≤ 1.02)")


if __name__ == "__main__":
    main()
