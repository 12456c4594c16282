"""Merge throughput (GB/s of weights read) and peak memory vs model size: fusekit's streaming merge vs
loading whole models into memory (the baseline, same methods' arithmetic), and vs mergekit if it is
importable by some Python.

    python benchmarks/bench_merge.py [--quick] [--mergekit-python /path/to/python]

Models are llama-shaped bf16 checkpoints of random weights (hidden 1024, vocab 8000, as many layers as
the size needs), a base and two fine-tuned variants, sharded at 200 MB like HF checkpoints. Each merge
runs in a fresh subprocess that reports its wall time for the merge alone and its peak resident memory
above what it held before (VmHWM after − VmRSS before). mergekit (if found) is run the same way with its
default options (CPU, lazy unpickle) and the same YAML; import times are excluded for every tool. Inputs
are read once before timing, so all tools read from the page cache; outputs are synced between runs.
mergekit is looked for in this Python, in $MERGEKIT_PYTHON, then at --mergekit-python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

HIDDEN, INTER, VOCAB = 1024, 2816, 8000

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])

# Inline, not fusekit._procmem: the mergekit child may run in another Python without fusekit.
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

tool, method, base, models, out = args["tool"], args["method"], args["base"], args["models"], args["out"]
kw = {"density": 0.3} if method == "ties" else {}
if tool == "fusekit":
    from fusekit.merge import merge_models
    run = lambda: merge_models(base, models, out, method, progress=False, plot=False, max_shard_size="1GB", **kw)
elif tool == "in-memory":
    import glob, torch
    from safetensors.torch import load_file, save_file
    from fusekit.merge import TensorInputs, get_method
    fn = get_method(method).fn
    def run():
        def load(p):
            sd = {}
            for f in sorted(glob.glob(p + "/*.safetensors")):
                sd.update(load_file(f))
            return sd
        sds = [load(p) for p in [base, *models]]
        out_sd = {}
        for name, b in sds[0].items():
            x = TensorInputs(name, b.float(), [sd[name].float() for sd in sds[1:]], (1.0,) * len(models),
                             (kw.get("density", 1.0),) * len(models), normalize=method == "ties")
            out_sd[name] = fn(x).tensor.to(b.dtype)
        import os
        os.makedirs(out, exist_ok=True)
        save_file(out_sd, out + "/model.safetensors", metadata={"format": "pt"})
else:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    params = {"weight": 1.0, **kw}
    config = {"merge_method": method, "base_model": base, "dtype": "bfloat16",
              "models": [{"model": m, "parameters": params} for m in models]}
    if method == "linear":
        del config["base_model"]
    run = lambda: run_merge(MergeConfiguration.model_validate(config), out, MergeOptions(quiet=True, lazy_unpickle=True))
reset_peak()
before = status()
start = time.perf_counter()
run()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "growth_mb": status()["VmHWM"] - before["VmRSS"]}))
"""


def make_model(path: Path, layers: int, seed: int, base_seed: int = 0, scale: float = 0.01) -> int:
    """A llama-shaped bf16 checkpoint: the base's weights (base_seed) plus scale·noise(seed); returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    path.mkdir(parents=True)
    config.save_pretrained(path)
    g, noise = torch.Generator().manual_seed(base_seed), torch.Generator().manual_seed(seed)
    shard, shards, size, total, weight_map = {}, [], 0, 0, {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        if scale:
            t += scale * 0.02 * torch.randn(shape, generator=noise)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].nbytes
        total += shard[name].nbytes
        if size > 200e6:
            flush()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def layers_for(megabytes: float) -> int:
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, round((megabytes * 1e6 - fixed) / per_layer))


def find_mergekit(flag: str | None) -> str | None:
    for python in [sys.executable, os.environ.get("MERGEKIT_PYTHON"), flag]:
        if python and subprocess.run([python, "-c", "import mergekit"], capture_output=True).returncode == 0:
            return python
    return None


def measure(python: str, tool: str, method: str, root: Path, tag: str) -> dict:
    args = {
        "tool": tool, "method": method, "base": str(root / "base"),
        "models": [str(root / "m1"), str(root / "m2")], "out": str(root / f"out_{tool}_{method}_{tag}"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([python, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-2000:]}")
    subprocess.run(["rm", "-rf", args["out"]])
    os.sync()  # the next tool should not pay for this one's writeback
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 200 MB models only, varm and ties")
    parser.add_argument("--mergekit-python", help="a Python that can import mergekit (e.g. a separate venv)")
    parser.add_argument("--sizes", type=float, nargs="*", help="model sizes in MB (default 50 200 1000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (fastest time, largest peak kept)")
    args = parser.parse_args()
    sizes = args.sizes or ([50, 200] if args.quick else [50, 200, 1000])
    methods = ["varm", "ties"] if args.quick else ["varm", "linear", "ties"]
    mk_python = find_mergekit(args.mergekit_python)
    print(f"mergekit: {'via ' + mk_python if mk_python else 'not found (fusekit vs in-memory only)'}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        for mb in sizes:
            root = Path(tmp) / f"m{mb:g}"
            layers = layers_for(mb)
            nbytes = make_model(root / "base", layers, seed=0, scale=0.0)
            make_model(root / "m1", layers, seed=1)
            make_model(root / "m2", layers, seed=2)
            read_gb = 3 * nbytes / 1e9
            # Flush the freshly written inputs and read them once, so no tool pays for the writeback or
            # for cold reads that the next one would not (every tool then reads from the page cache).
            os.sync()
            for f in root.rglob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            for method in methods:
                tools = ["fusekit", "in-memory"] + (["mergekit"] if mk_python and method != "varm" else [])
                res = {}
                for tool in tools:
                    python = mk_python if tool == "mergekit" else sys.executable
                    runs = [measure(python, tool, method, root, f"{mb:g}") for _ in range(args.repeat)]
                    res[tool] = {"seconds": min(r["seconds"] for r in runs), "growth_mb": max(r["growth_mb"] for r in runs)}
                for tool in tools:
                    r = res[tool]
                    rows.append([
                        f"{nbytes / 1e6:.0f} MB", method, tool, read_gb / r["seconds"], r["growth_mb"],
                        r["seconds"] / res["fusekit"]["seconds"],
                    ])
            subprocess.run(["rm", "-rf", str(root)])
    print_table(
        "merge of a base + 2 models (bf16): GB/s of weights read, peak RSS growth, time ÷ fusekit's",
        ["model size", "method", "tool", "GB/s", "peak MB", "time ÷ fusekit"],
        rows,
    )
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}; cores: {os.cpu_count()}; "
          f"layers per size: {[layers_for(mb) for mb in sizes]}")


if __name__ == "__main__":
    main()
