"""`--report-to`: TensorBoard, W&B (offline) and MLflow (file store) hold every step of metrics.jsonl;
a tracking library that fails mid-run costs one warning line and nothing else; the model card.

One real fusion run (a tiny target and a source with another tokenizer: extract → align → train with
all three trackers) is read back with each library's own reader.
"""

from __future__ import annotations

import itertools
import json
import re
import sys

import numpy as np
import pytest
import torch
import yaml

import fusekit
from fusekit import zoo
from fusekit.models.load import load_model
from fusekit.train import checkpoint as ckpt
from fusekit.train import engine
from fusekit.train.ddp import Dist
from fusekit.train.tracking import TrackingError, parse_report_to, scalars

for module in ("tensorboard", "wandb", "mlflow"):
    pytest.importorskip(module, reason="pip install 'fusekit[track]'")


@pytest.fixture(scope="module")
def run(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    target = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], root / "target", hidden=32, layers=1, context=64)
    source = zoo.build_tiny_model("gpt2", tokenizers_by_kind["unigram"], root / "source", hidden=32, layers=1, context=64)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in corpus_texts[:16]))
    for name, model in (("target", target), ("source", source)):
        fusekit.run_extract(model, corpus, root / "extract" / name, top_k=4, max_length=32, batch_size=8, progress=False).out
    fusekit.run_align(root / "extract" / "target", [root / "extract" / "source"], root / "aligned", progress=False).report
    out = fusekit.run_train(
        target, root / "aligned", root / "fused", lam=0.7, lr=1e-3, batch_size=4, max_length=32, max_steps=5,
        report_to=["tensorboard", "wandb", "mlflow"], progress=False,
    ).out
    log = engine.read_metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    return {"out": out, "log": log, "target": target}


def expected(log: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) series per scalar."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in log:
        for key, value in scalars(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def tensorboard_series(folder) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's scalars dashboard reads (its plugin accumulator, restarts purged)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={TENSORS: 0})
    acc.Reload()
    return {
        tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"] if tag != "config/text_summary"
    }


def mlflow_series(out, keys) -> tuple[dict, dict]:
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    series = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(state["run_id"], k), key=lambda m: m.step)] for k in keys}
    return series, client.get_run(state["run_id"]).data.params


def test_every_step_reaches_tensorboard_wandb_and_mlflow(run):
    from wandb_log import read_run

    want = expected(run["log"])
    assert {"loss", "clm", "fusion", "lr", "grad_norm", "tokens_per_s", "peak_memory_mib"} <= set(want)

    assert tensorboard_series(run["out"] / "tensorboard") == want

    (offline,) = (run["out"] / "wandb").glob("offline-run-*")
    wb = read_run(offline)
    got = {k: [(h["_step"], h[k]) for h in wb["history"] if k in h] for k in want}
    assert got == want
    assert wb["config"]["config"]["lam"] == 0.7 and wb["config"]["report_to"] == ["tensorboard", "wandb", "mlflow"]

    series, params = mlflow_series(run["out"], want)
    assert series == want
    assert params["config.lam"] == "0.7" and params["config.fusion"] == "min_ce"


def test_model_card_names_what_the_run_used(run):
    text = (run["out"] / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"fusekit", "knowledge-fusion", "fusellm", "min-ce"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is not a hub id
    assert f"`{run['target']}`" in body
    assert "| source | bytespan | 4 |" in body  # the source, how it was aligned, its top-k
    assert "λ = 0.7" in body and "MinCE" in body
    assert "| preset | `fusellm` |" in body and "| fusion | `min_ce` |" in body
    assert "| optimizer steps | 5 |" in body
    first, last = run["log"][0]["loss"], run["log"][-1]["loss"]
    assert f"{first:.4g} → {last:.4g}" in body


def test_a_tracker_failing_mid_run_costs_one_warning(tokenizers_by_kind, tmp_path, capfd, monkeypatch):
    """MLflow's store vanishes after step 2: the run finishes, TensorBoard and metrics.jsonl hold every step."""
    from fusekit.train.tracking import MlflowBackend

    monkeypatch.setattr(MlflowBackend, "FLUSH_STEPS", 1)  # send every step at once (it batches by default)
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "m", hidden=32, layers=1)
    out = tmp_path / "run"
    objective = BreaksMlflow(out, [np.arange(3, 19) + i for i in range(6)])
    net = load_model(model).train()
    settings = engine.EngineSettings(lr=1e-3, report_to=("tensorboard", "mlflow"))
    result = engine.run(net, objective, out, settings, Dist(), torch.device("cpu"), progress=False)
    assert result.finished and result.step == 6
    log = engine.read_metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_series(out / "tensorboard") == expected(log)
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning:")]
    # The store goes while the tracking thread may still be writing step 2: it fails at step 2 or 3.
    assert len(warnings) == 1 and re.search(r"mlflow tracking failed at step [23] ", warnings[0]), warnings
    assert "the run goes on (metrics.jsonl has every step)" in warnings[0]


def test_resumed_run_continues_the_same_tracking_runs(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "m", hidden=32, layers=1)
    seqs = [np.arange(3, 19) + i for i in range(6)]
    out = tmp_path / "run"
    settings = dict(lr=1e-3, report_to=("tensorboard", "mlflow"))
    net = load_model(model).train()
    first = engine.run(net, ToyCLM(seqs), out, engine.EngineSettings(**settings, stop_after=4), Dist(), torch.device("cpu"), progress=False)
    assert first.step == 4 and not first.finished
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    checkpoint = ckpt.list_checkpoints(out)[-1]
    net = load_model(checkpoint).train()
    engine.run(net, ToyCLM(seqs), out, engine.EngineSettings(**settings), Dist(), torch.device("cpu"), start=checkpoint, progress=False)
    log = engine.read_metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_series(out / "tensorboard") == expected(log)
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    series, _ = mlflow_series(out, ["loss"])
    assert series["loss"] == expected(log)["loss"]


def test_bad_report_to_is_one_clear_line(monkeypatch):
    assert parse_report_to("tensorboard, MLflow,none") == ["tensorboard", "mlflow"]
    with pytest.raises(TrackingError, match="unknown --report-to tensorbord: choose from tensorboard, wandb, mlflow"):
        parse_report_to("tensorbord")
    from typer.testing import CliRunner

    from fusekit.cli import app

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    result = CliRunner().invoke(app, ["train", "--model", "m", "--aligned", "a", "--out", "o", "--report-to", "wandb"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --report-to wandb needs the wandb package, which is not installed: pip install 'fusekit[track]'"


IGNORE = -100


class ToyCLM:
    """One sequence per step, next-token CE summed over its tokens (the engine's Objective protocol)."""

    sums = ("loss",)

    def __init__(self, seqs):
        self.seqs, self.total_steps = seqs, len(seqs)

    def micro_batches(self, step, rank):
        ids = torch.as_tensor(self.seqs[step])[None]
        return [ids]

    def units(self, batch):
        return batch.shape[1] - 1

    def tokens(self, batch):
        return batch.shape[1]

    def forward(self, model, batch, step, device):
        logits = model(input_ids=batch.to(device)).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, batch[0, 1:].to(device), reduction="sum")
        return loss, loss.detach().reshape(1)

    def report(self, sums, units, step):
        return {"loss": sums[0] / units}


class BreaksMlflow(ToyCLM):
    """After step 2 the MLflow file store is replaced by a plain file (a store that went away)."""

    def __init__(self, out, seqs):
        super().__init__(seqs)
        self.out = out

    def report(self, sums, units, step):
        if step == 2:  # 0-based: the third step's metrics are the first the broken store refuses
            # The tracking thread may be writing step 2 into the store right now, so it is moved aside
            # (one rename) rather than deleted file by file, and a file takes its place by a rename that
            # fails while a directory of that name exists (the thread may have made one meanwhile).
            store, plain = self.out / "mlruns", self.out / "mlruns.file"
            plain.write_text("not a store any more")
            for attempt in itertools.count():
                if store.is_dir():
                    store.rename(self.out / f"mlruns.gone{attempt}")
                try:
                    plain.rename(store)
                    break
                except IsADirectoryError:
                    continue
        return super().report(sums, units, step)
