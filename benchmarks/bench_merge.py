"""Merge throughput (GB/s of weights read) and peak memory vs model size: fusekit's streaming merge vs
loading whole models into memory (the baseline, same methods' arithmetic), and vs mergekit if it is
importable by some Python — both tools run the same mergekit YAML, and their outputs are compared.

    python benchmarks/bench_merge.py [--quick] [--mergekit-python /path/to/python]
    python benchmarks/bench_merge.py --sizes 537 --dtype float32 --methods linear ties sce   # the issue's goal
    python benchmarks/bench_merge.py --sizes 50 --methods all                               # every method vs mergekit

Models are llama-shaped checkpoints (bf16 by default, --dtype float32) of random weights (hidden 1024,
vocab 8000, as many layers as the size needs), a base and two fine-tuned variants, sharded at 200 MB like
HF checkpoints. Each merge runs in a fresh subprocess that reports its wall time for the merge alone and
its peak resident memory above what it held before (VmHWM after − VmRSS before). mergekit (if found) is
run the same way with its default options (CPU, lazy unpickle); import times are excluded for every tool.
Inputs are read once before timing, so all tools read from the page cache; outputs are synced between
runs. "max rel diff" is max |fusekit − mergekit| / max |mergekit| over every tensor, with the share of entries
off by more than 1e-6 of that scale (for DARE/DELLA, whose masks differ by design, the relative difference
of each tensor's merged task-vector L1 norm instead: exact with one model, a few % with two); mergekit
computes in the YAML's dtype, so bf16 models differ by bf16 rounding. mergekit is looked for in this
Python, in $MERGEKIT_PYTHON, then at --mergekit-python.
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

tool, config, out = args["tool"], args["config"], args["out"]
if tool == "fusekit":
    from fusekit.merge import merge
    run = lambda: merge(config=config, out=out, progress=False, plot=False, max_shard_size="1GB")
elif tool == "in-memory":
    import glob, torch
    from safetensors.torch import load_file, save_file
    from fusekit.merge import TensorInputs, get_method
    spec = get_method(config["merge_method"])
    base = config.get("base_model") or config["models"][0]["model"]
    models = [m["model"] for m in config["models"]]
    per = [dict(m.get("parameters", {})) for m in config["models"]]
    glob_params = {**spec.parameter_names()[0], **config.get("parameters", {})}
    def run():
        def load(p):
            sd = {}
            for f in sorted(glob.glob(p + "/*.safetensors")):
                sd.update(load_file(f))
            return sd
        sds = [load(p) for p in [base, *models]]
        out_sd = {}
        for name, b in sds[0].items():
            x = TensorInputs(name, b.float(), [sd[name].float() for sd in sds[1:]],
                             tuple(p.get("weight", 1.0) for p in per), tuple(p.get("density", 1.0) for p in per),
                             normalize=bool(glob_params.get("normalize", False)), params=glob_params,
                             model_params=tuple(per), has_base="base_model" in config)
            out_sd[name] = spec.fn(x).tensor.to(b.dtype)
        import os
        os.makedirs(out, exist_ok=True)
        save_file(out_sd, out + "/model.safetensors", metadata={"format": "pt"})
else:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run = lambda: run_merge(MergeConfiguration.model_validate(config), out, MergeOptions(quiet=True, lazy_unpickle=True))
reset_peak()
before = status()
start = time.perf_counter()
run()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "growth_mb": status()["VmHWM"] - before["VmRSS"]}))
"""


def make_model(path: Path, layers: int, seed: int, dtype: str, base_seed: int = 0, scale: float = 0.01) -> int:
    """A llama-shaped checkpoint: the base's weights (base_seed) plus scale·noise(seed); returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype=dtype,
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
        shard[name] = t.to(getattr(torch, dtype))
        size += shard[name].nbytes
        total += shard[name].nbytes
        if size > 200e6:
            flush()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def layers_for(megabytes: float, itemsize: int = 2) -> int:
    per_layer = itemsize * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
    fixed = itemsize * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, round((megabytes * 1e6 - fixed) / per_layer))


def find_mergekit(flag: str | None) -> str | None:
    for python in [sys.executable, os.environ.get("MERGEKIT_PYTHON"), flag]:
        if python and subprocess.run([python, "-c", "import mergekit"], capture_output=True).returncode == 0:
            return python
    return None


ALL_METHODS = ["varm", "linear", "task_arithmetic", "ties", "sce", "dare_linear", "dare_ties", "della", "della_linear",
               "breadcrumbs", "breadcrumbs_ties", "model_stock", "slerp", "nuslerp"]  # fmt: skip
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
IN_MEMORY = {"varm", "linear", "ties", "sce"}


def yaml_config(method: str, root: Path, dtype: str) -> dict:
    """The mergekit YAML both tools run for `method` on the base + m1 + m2 of `root`."""
    base, m1, m2 = (str(root / n) for n in ("base", "m1", "m2"))
    per = {"weight": 1.0}
    if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"):
        per = {"weight": 1.0, "density": 0.3}
    if method in ("della", "della_linear"):
        per = {"weight": 1.0, "density": 0.3, "epsilon": 0.1}
    if method in ("varm", "sce", "model_stock"):
        per = {}
    config = {"merge_method": method, "base_model": base, "dtype": dtype,
              "models": [{"model": m, "parameters": per} for m in (m1, m2)]}  # fmt: skip
    if method == "linear":
        del config["base_model"]
    if method == "sce":
        config["parameters"] = {"select_topk": 0.3}
    if method == "slerp":
        config["models"] = [{"model": base}, {"model": m1}]
        config["parameters"] = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]}
    if method == "nuslerp":
        config["models"][1]["parameters"] = {"weight": 3.0}
    return config


def measure(python: str, tool: str, config: dict, out: Path) -> dict:
    args = {"tool": tool, "config": config, "out": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([python, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {config['merge_method']} failed:\n{proc.stderr[-2000:]}")
    os.sync()  # the next tool should not pay for this one's writeback
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(mine: Path, theirs: Path, base: Path, random: bool) -> tuple[float, float]:
    """(max over tensors of |fusekit − mergekit| / max|mergekit|, share of entries off by > 1e-6 relative).

    Random methods: the relative difference of each tensor's task-vector L1 norm, and no share.
    """
    from safetensors import safe_open

    def tensors(folder: Path):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    yield k, f

    where = dict(tensors(theirs))
    base_where = dict(tensors(base))
    worst, off, total = 0.0, 0, 0
    for name, f in tensors(mine):
        with safe_open(f, framework="pt") as h:
            a = h.get_tensor(name).double()
        with safe_open(where[name], framework="pt") as h:
            b = h.get_tensor(name).double()
        if random:
            with safe_open(base_where[name], framework="pt") as h:
                z = h.get_tensor(name).double()
            la, lb = float((a - z).abs().sum()), float((b - z).abs().sum())
            worst = max(worst, abs(la - lb) / max(lb, 1e-12))
        else:
            scale = max(float(b.abs().max()), 1e-12)
            worst = max(worst, float((a - b).abs().max()) / scale)
            off += int(((a - b).abs() > 1e-6 * scale).sum())
            total += a.numel()
    return worst, (off / total if total else 0.0)


def _diff_text(diff: tuple[float, float], random: bool) -> str:
    worst, share = diff
    return f"{worst:.1e} (L1)" if random else f"{worst:.1e} ({share:.0e} off)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 200 MB models only, varm, ties and sce")
    parser.add_argument("--mergekit-python", help="a Python that can import mergekit (e.g. a separate venv)")
    parser.add_argument("--sizes", type=float, nargs="*", help="model sizes in MB (default 50 200 1000)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the models' dtype")
    parser.add_argument("--methods", nargs="*", help=f"methods to run, or 'all' (default varm linear ties sce); from {ALL_METHODS}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (fastest time, largest peak kept)")
    args = parser.parse_args()
    sizes = args.sizes or ([50, 200] if args.quick else [50, 200, 1000])
    methods = args.methods or (["varm", "ties", "sce"] if args.quick else ["varm", "linear", "ties", "sce"])
    methods = ALL_METHODS if methods == ["all"] else methods
    itemsize = 2 if args.dtype == "bfloat16" else 4
    mk_python = find_mergekit(args.mergekit_python)
    print(f"mergekit: {'via ' + mk_python if mk_python else 'not found (fusekit vs in-memory only)'}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        for mb in sizes:
            root = Path(tmp) / f"m{mb:g}"
            layers = layers_for(mb, itemsize)
            nbytes = make_model(root / "base", layers, seed=0, dtype=args.dtype, scale=0.0)
            make_model(root / "m1", layers, seed=1, dtype=args.dtype)
            make_model(root / "m2", layers, seed=2, dtype=args.dtype)
            read_gb = 3 * nbytes / 1e9
            # Flush the freshly written inputs and read them once, so no tool pays for the writeback or
            # for cold reads that the next one would not (every tool then reads from the page cache).
            os.sync()
            for f in root.rglob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            for method in methods:
                config = yaml_config(method, root, args.dtype)
                tools = ["fusekit"] + (["in-memory"] if method in IN_MEMORY else [])
                tools += ["mergekit"] if mk_python and method != "varm" else []
                res, outs = {}, {}
                for tool in tools:
                    python = mk_python if tool == "mergekit" else sys.executable
                    runs = []
                    for i in range(args.repeat):
                        outs[tool] = root / f"out_{tool}_{method}_{i}"
                        runs.append(measure(python, tool, config, outs[tool]))
                        if i + 1 < args.repeat:
                            subprocess.run(["rm", "-rf", str(outs[tool])])
                    res[tool] = {"seconds": min(r["seconds"] for r in runs), "growth_mb": max(r["growth_mb"] for r in runs)}
                diff = compare(outs["fusekit"], outs["mergekit"], root / "base", method in RANDOM) if "mergekit" in outs else None
                for tool in tools:
                    r = res[tool]
                    rows.append([
                        f"{nbytes / 1e6:.0f} MB", method, tool, read_gb / r["seconds"], r["growth_mb"],
                        r["seconds"] / res["fusekit"]["seconds"], r["growth_mb"] / max(res["fusekit"]["growth_mb"], 1e-9),
                        _diff_text(diff, method in RANDOM) if tool == "mergekit" and diff is not None else "",
                    ])
                for o in outs.values():
                    subprocess.run(["rm", "-rf", str(o)])
            subprocess.run(["rm", "-rf", str(root)])
    print_table(
        f"merge of a base + 2 models ({args.dtype}): GB/s of weights read, peak RSS growth, ratios to fusekit",
        ["model size", "method", "tool", "GB/s", "peak MB", "time ÷ fusekit", "peak ÷ fusekit", "max rel diff (share off)"],
        rows,
    )
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}; cores: {os.cpu_count()}; "
          f"layers per size: {[layers_for(mb, itemsize) for mb in sizes]}")


if __name__ == "__main__":
    main()
