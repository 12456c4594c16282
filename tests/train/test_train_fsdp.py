"""FSDP2 on gloo, with real CPU processes under torchrun.

One 2-process launch checks, in order: the meta-device build + rank-0 broadcast gives a plain load's
weights bit for bit (tied GPT-2, untied Llama, a GGUF Llama); FSDP2 with activation checkpointing trains
like one process (and exports a sharded HF folder that `from_pretrained` reads); FSDP2 without
checkpointing trains like one process until rank 1 is killed while writing its part of a checkpoint.
Then the previous checkpoint resumes on 1 process and on 4 and both end like the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from fusekit.train import checkpoint as ckpt
from tiny_models import write_tiny_llama_gguf
from torchrun_helpers import metrics, torchrun, uneven_windows

pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")

COMMON = dict(lam=0.7, fusion="min_ce", granularity="token", lr=1e-3, batch_size=1, max_length=24, progress=False)

WORKER = """
import os, pickle, sys
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
import fusekit
import fusekit.train.meta_init as meta_init
import fusekit.train.sharded_state as sharded_state
from fusekit.models.load import load_model
from fusekit.train.ddp import init_distributed, shard
from fusekit.train.head import FusionStep

windows_file, model, out_a, out_b, killed, *refs = sys.argv[1:]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
d = init_distributed()
cpu = torch.device("cpu")
common = dict(lam=0.7, fusion="min_ce", granularity="token", lr=1e-3, batch_size=1, max_length=24, progress=False)

# 1. Meta build + rank-0 broadcast == a plain load, bit for bit; only rank 0 reads the file.
readers = []
read = meta_init.load_weights
meta_init.load_weights = lambda ref: (readers.append(d.rank), read(ref))[1]
for ref in refs:
    lm, step = meta_init.build_sharded(ref, d, cpu, prepare=lambda lm: shard(FusionStep(lm, fused=False), cpu))
    local = sum(p.to_local().numel() for p in step.parameters())
    total = sum(p.numel() for p in step.parameters())
    assert local < 0.6 * total, (ref, local, total)  # this rank holds its shards only
    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {n: b.clone() for n, b in lm.named_buffers()}
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if d.is_main:
        plain = load_model(ref)
        want = plain.state_dict()
        assert full.keys() == want.keys(), ref
        for k in want:
            assert torch.equal(full[k], want[k]), (ref, k)
        plain_buffers = dict(plain.named_buffers())
        assert buffers.keys() == plain_buffers.keys(), ref
        for k in plain_buffers:
            assert torch.equal(buffers[k], plain_buffers[k]), (ref, k)
        assert tied == (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight), ref
assert readers == ([0] * len(refs) if d.is_main else []), readers

# 2. FSDP2 + activation checkpointing; the final model split into files of <= 40 kB.
sharded_state.EXPORT_SHARD_BYTES = 40_000
fusekit.run_train(model, windows, out_a, fsdp=True, gradient_checkpointing=True, grad_accum=2, save_every=1, **common).out

# 3. FSDP2 without checkpointing; rank 1 dies while writing its optimizer part of the step-2 checkpoint.
write = sharded_state.save_tensors
def dying(folder, tensors, index):
    if d.rank == 1 and folder.parent.name == ".tmp-step-00000002" and folder.name == "optimizer":
        open(killed, "w").write("rank 1 killed mid-save")
        os._exit(17)
    write(folder, tensors, index)
sharded_state.save_tensors = dying
fusekit.run_train(model, windows, out_b, fsdp=True, grad_accum=2, save_every=1, **common).out
"""

RESUME = """
import pickle, sys
import fusekit
windows_file, model, out = sys.argv[1:4]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
fusekit.run_train(model, windows, out, fsdp=True, grad_accum=1, resume=True, lam=0.7, fusion="min_ce", granularity="token",
              lr=1e-3, batch_size=1, max_length=24, progress=False).out
"""


def _same_run(log: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in log] == [m["step"] for m in reference]
    for a, b in zip(log, reference):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_meta_init_checkpointing_sharded_checkpoints_kill_and_resume_on_other_world_sizes(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)  # untied, rotary buffers
    gpt2 = zoo.build_tiny_model("gpt2", tok, tmp_path / "gpt2", hidden=32)  # tied
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")  # tied
    windows = uneven_windows(len(tok))
    a, b, killed = tmp_path / "a", tmp_path / "b", tmp_path / "killed"
    run = torchrun(tmp_path, WORKER, windows, model, a, b, killed, model, gpt2, gguf, check=False)
    assert killed.is_file() and run.returncode != 0, run.stderr[-3000:]  # everything before the kill passed

    # One process with 4 micro-batches a step = 2 processes with 2 each.
    single = fusekit.run_train(model, windows, tmp_path / "single", grad_accum=4, **COMMON).out
    reference, want = metrics(single), load_file(str(single / "model.safetensors"))
    assert len(reference) == 3

    # FSDP2 + checkpointing trains like one process; its final model is an HF folder in several files.
    _same_run(metrics(a), reference)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (a / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).state_dict()
    _same_weights({k: exported[k] for k in want}, want)
    # Its checkpoints are sharded: each rank's file holds half of every matrix's rows, no file is a pickle.
    step2 = a / "checkpoints" / "step-00000002"
    assert not (step2 / "model.safetensors").exists() and not list(step2.rglob("*.pt"))
    with safe_open(str(next((step2 / "model").glob("shard-00002-*.safetensors"))), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [len(tok) // 2, 32]

    # Without checkpointing too, until the kill; the kill left step 1 as the last checkpoint.
    _same_run(metrics(b), reference[:2])
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["step-00000001"]
    assert (b / "checkpoints" / ".tmp-step-00000002").is_dir()

    # Resume on 1 process (4 micro-batches a step) and on 4 (1 each): the uninterrupted run's steps 2-3.
    one, four = tmp_path / "one", tmp_path / "four"
    shutil.copytree(b, one)
    shutil.copytree(b, four)
    fusekit.run_train(model, windows, one, grad_accum=4, resume=True, **COMMON).out
    _same_run(metrics(one), reference)
    _same_weights(load_file(str(one / "model.safetensors")), want)
    torchrun(tmp_path, RESUME, windows, model, four, nproc=4)
    _same_run(metrics(four), reference)
    _same_weights(load_file(str(four / "model.safetensors")), want)

    # Refused before any step: another target, or another number of rows per step.
    with pytest.raises(fusekit.train.TrainError, match="another model"):
        fusekit.run_train(gpt2, windows, b, grad_accum=4, resume=True, **COMMON).out
    with pytest.raises(fusekit.train.TrainError, match="--grad-accum 4"):
        fusekit.run_train(model, windows, b, grad_accum=2, resume=True, **COMMON).out
    assert len(metrics(b)) == 2


def test_fsdp_outside_torchrun_is_refused_with_the_command_to_run(tokenizers_by_kind, tmp_path):
    model = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], tmp_path / "model", hidden=32)
    with pytest.raises(fusekit.train.TrainConfigError, match="torchrun --nproc-per-node N") as err:
        fusekit.run_train(model, uneven_windows(800), tmp_path / "out", fsdp=True, **COMMON).out
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tokenizers_by_kind, tmp_path, monkeypatch):
    """The step-2 save fails with ENOSPC while writing the optimizer: step 1 stays the last checkpoint, and
    resuming from it ends with the weights of an uninterrupted run."""
    import errno

    import fusekit.train.sharded_state as sharded_state

    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)
    windows = uneven_windows(len(tok))
    whole = fusekit.run_train(model, windows, tmp_path / "whole", grad_accum=4, **COMMON).out
    write = sharded_state.save_tensors

    def disk_full(folder, tensors, index):
        if folder.parent.name == ".tmp-step-00000002":
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        write(folder, tensors, index)

    monkeypatch.setattr(sharded_state, "save_tensors", disk_full)
    out = tmp_path / "full-disk"
    with pytest.raises(OSError, match="No space left"):
        fusekit.run_train(model, windows, out, grad_accum=4, save_every=1, **COMMON).out
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
    monkeypatch.setattr(sharded_state, "save_tensors", write)
    fusekit.run_train(model, windows, out, grad_accum=4, save_every=1, resume=True, **COMMON).out
    _same_run(metrics(out), metrics(whole))
    _same_weights(load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors")))
    assert not list((out / "checkpoints").glob(".tmp-*"))
