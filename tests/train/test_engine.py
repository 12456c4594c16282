"""The training engine on its own (a toy CLM objective, a tiny real model): unit-normalised accumulation,
stop + resume = uninterrupted, the checkpoint rules, and the layering (fusekit.train knows no caller)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fusekit import zoo
from fusekit.models.load import load_model
from fusekit.train import checkpoint as ckpt
from fusekit.train import engine
from fusekit.train.ddp import Dist

IGNORE = -100


class ToyCLM:
    """Next-token CE summed over label tokens; `groups[s]` = the micro-batches of step s, each a list of
    sequences (right-padded into one tensor, padding ignored)."""

    sums = ("loss",)

    def __init__(self, groups: list[list[list[np.ndarray]]]):
        self.groups, self.total_steps = groups, len(groups)

    def micro_batches(self, step, rank):
        out = []
        for seqs in self.groups[step]:
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.as_tensor(s)
                labels[r, : len(s)] = torch.as_tensor(s)
            out.append((ids, labels))
        return out

    def units(self, batch):
        return int((batch[1][:, 1:] != IGNORE).sum())

    def tokens(self, batch):
        return int((batch[1] != IGNORE).sum())

    def forward(self, model, batch, step, device):
        ids, labels = batch
        logits = model(input_ids=ids.to(device)).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device), ignore_index=IGNORE, reduction="sum"
        )
        return loss, loss.detach().reshape(1)

    def report(self, sums, units, step):
        return {"loss": sums[0] / units}


@pytest.fixture(scope="module")
def toy(tokenizers_by_kind, tmp_path_factory):
    tok = tokenizers_by_kind["bpe"]
    root = tmp_path_factory.mktemp("engine")
    models = {kind: zoo.build_tiny_model(kind, tok, root / kind, seed=0, hidden=32) for kind in ("llama", "gpt2")}
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, len(tok), size=n) for n in (12, 5, 9, 16, 7, 11, 6, 14)]
    return models, seqs


SETTINGS = dict(lr=1e-3, weight_decay=0.1, warmup_ratio=0.25, clip=1.0)


def _train(model_ref, objective, out, start=None, **options):
    torch.manual_seed(0)  # GPT-2 has dropout: both runs draw the same masks
    net = load_model(start or model_ref)
    net.train()
    result = engine.run(net, objective, out, engine.EngineSettings(**{**SETTINGS, **options}), Dist(), torch.device("cpu"),
                        start=start, progress=False)
    return net, result


def test_split_into_micro_batches_changes_nothing_because_losses_are_unit_sums(toy, tmp_path):
    """Sequences of unequal length: one micro-batch of two vs two micro-batches of one. A mean per
    micro-batch would weigh the short sequence's tokens more; sums over the step's tokens do not.
    (Llama: no dropout, whose masks would differ with the batch shape.)"""
    models, seqs = toy
    model = models["llama"]
    whole = ToyCLM([[seqs[2 * s : 2 * s + 2]] for s in range(4)])
    split = ToyCLM([[[seqs[2 * s]], [seqs[2 * s + 1]]] for s in range(4)])
    a, ra = _train(model, whole, tmp_path / "a")
    b, rb = _train(model, split, tmp_path / "b")
    assert ra.finished and rb.finished and ra.step == rb.step == 4
    la, lb = engine.read_metrics(tmp_path / "a"), engine.read_metrics(tmp_path / "b")
    assert [r["tokens"] for r in la] == [r["tokens"] for r in lb] == [len(seqs[2 * s]) + len(seqs[2 * s + 1]) for s in range(4)]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_stop_and_resume_equal_an_uninterrupted_run(toy, tmp_path):
    """GPT-2 has dropout: equal weights need the RNG state restored too."""
    models, seqs = toy
    model = models["gpt2"]
    objective = ToyCLM([[seqs[s : s + 2]] for s in range(6)])
    full, _ = _train(model, objective, tmp_path / "full", save_every=2)
    # Periodic checkpoints and the last step's; keep_checkpoints=2 keeps the two latest.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "full")] == ["step-00000004", "step-00000006"]

    part = tmp_path / "part"
    _, first = _train(model, objective, part, stop_after=3, checkpoint_at_end=False)
    assert first.step == 3 and not first.finished and len(engine.read_metrics(part)) == 3
    start = ckpt.list_checkpoints(part)[-1]
    resumed, second = _train(model, objective, part, start=start, checkpoint_at_end=False)
    assert second.finished and second.last["run"]["steps"] == 3
    assert [r["step"] for r in engine.read_metrics(part)] == list(range(1, 7))
    assert [r["loss"] for r in engine.read_metrics(part)] == [r["loss"] for r in engine.read_metrics(tmp_path / "full")]
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step-00000003"]  # no checkpoint at the end


def test_the_training_package_imports_none_of_its_callers():
    code = (
        "import sys, fusekit.train.engine, fusekit.train.loop\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fusekit.implicit', 'fusekit.pipeline', 'fusekit.cli')))\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
