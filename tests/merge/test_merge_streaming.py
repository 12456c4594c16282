"""Streaming: merging models far larger than one tensor needs memory for a few tensors, not for the models.

The merge runs in a fresh subprocess that reports its resident-set peak (VmHWM) over the merge alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

N_TENSORS = 64
SHAPE = (256, 1024)  # 1 MiB per float32 tensor; a model is 64 MiB
TENSOR_MB = 1.0
MODEL_MB = N_TENSORS * TENSOR_MB


def synthetic_model(path: Path, seed: int, shards: int = 1, scale: float = 1.0, n: int = N_TENSORS, shape=SHAPE) -> Path:
    """A model folder of `n` float32 tensors, shared across `shards` files with an index when > 1."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 4}.w{i % 4}.weight" for i in range(n)]
    per = -(-n // shards)
    weight_map = {}
    for s in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {}
        for name in names[s * per : (s + 1) * per]:
            chunk[name] = torch.randn(shape, generator=g) + scale * torch.randn(shape, generator=noise)
            weight_map[name] = file
        save_file(chunk, path / file, metadata={"format": "pt"})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return path


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from fusekit._procmem import memory_mb as status, reset_peak
    from fusekit.merge import merge_models

    small, big, out = sys.argv[1], sys.argv[2], sys.argv[3]
    results = {}
    for method, kw in (("varm", {}), ("ties", {"density": 0.3})):
        # a small merge first: imports, allocator and plotting warm up outside the measurement
        merge_models(small + "/base", [small + "/m1", small + "/m2"], out + f"/warm_{method}", method, progress=False, **kw)
        reset = reset_peak()
        before = status()
        merge_models(big + "/base", [big + "/m1", big + "/m2"], out + f"/{method}", method, progress=False, max_shard_size="20MB", **kw)
        results[method] = {"growth_mb": status()["VmHWM"] - before["VmRSS"], "reset": reset}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    synthetic_model(root / "big" / "base", 0, shards=3, scale=0.0)
    synthetic_model(root / "big" / "m1", 1, scale=0.01)
    synthetic_model(root / "big" / "m2", 2, shards=2, scale=0.02)
    for name, seed in (("base", 0), ("m1", 1), ("m2", 2)):
        synthetic_model(root / "small" / name, seed, scale=0.01 * seed, n=4)
    return root


def test_peak_memory_stays_near_a_few_tensors(models, tmp_path):
    # Large blocks straight from mmap: freed tensors go back to the OS, so the peak measures live tensors,
    # not what glibc's heap happens to retain (which varies from run to run).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(models / "small"), str(models / "big"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    inputs_mb = 3 * MODEL_MB
    for method, r in results.items():
        # base + 2 models + deltas + result + TIES' masks: about ten 1 MiB tensors; the inputs are 192 MiB.
        assert r["growth_mb"] < 16 * TENSOR_MB, f"{method}: peak grew {r['growth_mb']:.1f} MiB merging {inputs_mb:.0f} MiB"
    out = tmp_path / "varm"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == N_TENSORS and len(set(index["weight_map"].values())) >= 3
