"""Hugging Face model folders read and written one tensor at a time.

Reading: tensor metadata comes from the safetensors headers (parsed here, so tensors are visited in file
order for sequential IO); each tensor is read with `safe_open`, opened per tensor so that no mapping of a
whole shard stays resident. Writing: the output's shapes and dtypes are known before the first tensor is
merged, so each shard's header is written up front and tensors are appended as they are produced —
memory holds one tensor, never a shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fusekit.merge.errors import MergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes ↔ torch dtypes (the subset HF checkpoints use).
CODE_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    CODE_TO_DTYPE["F8_E4M3"] = torch.float8_e4m3fn
    CODE_TO_DTYPE["F8_E5M2"] = torch.float8_e5m2
DTYPE_TO_CODE = {v: k for k, v in CODE_TO_DTYPE.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}

_DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}  # fmt: skip


def dtype_code(name: str) -> str:
    """A user's dtype name (bfloat16, bf16, float32, …) as a safetensors code."""
    code = _DTYPE_NAMES.get(name.lower().removeprefix("torch."))
    if code is None:
        raise MergeError(f"unknown output dtype {name!r}: choose float32, bfloat16, float16 or float64")
    return code


def element_size(code: str) -> int:
    return torch.empty((), dtype=CODE_TO_DTYPE[code]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (without reading any tensor data)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise MergeError(f"{path} is not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


class ModelFolder:
    """The safetensors weights of a HF model folder: names, shapes, dtypes up front; tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise MergeError(f"no model folder at {self.path}")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            header = read_header(file)
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self.tensors:
                    raise MergeError(f"{self.path}: tensor {name!r} appears in two shards")
                if entry["dtype"] not in CODE_TO_DTYPE:
                    raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                self.tensors[name] = TensorInfo(name, tuple(entry["shape"]), entry["dtype"], file)
        if self.index_map is not None:
            missing = sorted(set(self.index_map) - set(self.tensors))
            if missing:
                raise MergeError(f"{self.path}: {INDEX_NAME} lists {missing[0]!r} but no shard holds it")

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        self.index_map: dict[str, str] | None = None
        if index.is_file():
            try:
                self.index_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise MergeError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            files = [self.path / f for f in dict.fromkeys(self.index_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise MergeError(f"{self.path}: shard {absent[0]} named in {INDEX_NAME} is missing")
            return sorted(files)
        if (self.path / SINGLE_NAME).is_file():
            return [self.path / SINGLE_NAME]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise MergeError(f"{self.path} has {len(found)} .safetensors files but no {INDEX_NAME}")
        legacy = sorted(p.name for p in self.path.glob("*.bin"))
        hint = f" (found {legacy[0]}: re-save it with save_pretrained(..., safe_serialization=True))" if legacy else ""
        raise MergeError(f"{self.path} has no safetensors weights{hint}")

    def read(self, name: str) -> torch.Tensor:
        """One tensor; the file is opened for this read only, so the mapping is released with the tensor."""
        from safetensors import safe_open

        with safe_open(self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def config(self) -> dict:
        path = self.path / "config.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text())


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MergeError(f"cannot read shard size {size!r}: write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


class ShardedWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_bytes` (one tensor may exceed it).

    Files are written as `*.tmp` and renamed by `finish()`, so an interrupted merge leaves no output that a
    loader would take for a model.
    """

    def __init__(self, out_dir: Path, plan: list[OutTensor], max_shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.queue = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self.pos = 0
        self.handle = None
        self.total_size = sum(t.nbytes for t in plan)

    def _tmp(self, i: int) -> Path:
        return self.out_dir / (self.names[i] + ".tmp")

    def _open(self, i: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.handle = open(self._tmp(i), "wb")
        self.handle.write(struct.pack("<Q", len(raw)))
        self.handle.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expect = self.queue[self.pos]
        if name != expect.name or tuple(tensor.shape) != expect.shape or DTYPE_TO_CODE[tensor.dtype] != expect.dtype:
            raise RuntimeError(f"writer expected {expect}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self.handle is None:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.pos += 1
        if self.pos == len(self.queue) or self.queue[self.pos][0] != shard:
            self.handle.close()
            self.handle = None

    def finish(self) -> list[Path]:
        if self.pos != len(self.queue):
            raise RuntimeError(f"writer finished after {self.pos} of {len(self.queue)} tensors")
        paths = []
        for i, name in enumerate(self.names):
            os.replace(self._tmp(i), self.out_dir / name)
            paths.append(self.out_dir / name)
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, t in self.queue}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return paths

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        for i in range(len(self.names)):
            self._tmp(i).unlink(missing_ok=True)


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")
# A merge's own reports describe that merge; a merge that starts from it must not inherit them.
REPORT_NAMES = ("fusekit_merge.json", "varm_weights.json", "varm_weights.png")
# What a trained folder says about its own run (fusekit train / implicit: the model card, the training log and
# summary, the trackers' state): true of the base, not of a merge of it, so never copied into one.
RUN_RECORD_NAMES = ("README.md", "metrics.jsonl", "fusekit_train.json", "tracking.json")


def is_weight_file(path: Path) -> bool:
    return any(path.match(p) for p in WEIGHT_PATTERNS)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Config, generation config, tokenizer and chat-template files of `src` (everything but weights, merge
    reports and the records of the run that trained `src`: its model card and logs describe that model)."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not is_weight_file(p) and not p.name.startswith(".") and p.name not in REPORT_NAMES and p.name not in RUN_RECORD_NAMES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def clear_weights(out_dir: Path) -> None:
    """Remove weight files of an earlier output, so no stale shard is left next to the new ones."""
    for p in out_dir.iterdir():
        if p.is_file() and is_weight_file(p):
            p.unlink()
