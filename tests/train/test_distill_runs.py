"""`fusekit distill` runs as a whole: resuming refuses a changed run (teachers, corpus, top-k, loss, policy)
before any step; the model card names the teachers, the loss, λ, the fusion rule and the policy; FSDP2
on two gloo processes gives the losses of one process."""

from __future__ import annotations

import json
import shutil

import pytest

from fusekit import zoo
from fusekit.train.loop import TrainError
from fusekit.train.model_card import read_card
from fusekit.train.online import distill
from torchrun_helpers import metrics

OPTS = dict(max_length=32, batch_size=1, shuffle=False, lr=1e-3, lam=0.5, progress=False)


@pytest.fixture(scope="module")
def interrupted(online_models, tokenizers_by_kind, tmp_path_factory):
    """A distill run stopped at its step-1 checkpoint (of 2), whose second teacher lives in a folder of its
    own (so its weights can be swapped in place), and the pieces to change it with."""
    root = tmp_path_factory.mktemp("resume")
    m = online_models
    t2 = shutil.copytree(m["teachers"][1], root / "t2")
    other_t2 = zoo.build_tiny_model("gpt2", tokenizers_by_kind["wordpiece"], root / "t2-other", hidden=32, context=64, seed=9)
    other_corpus = root / "other.txt"
    other_corpus.write_text(m["corpus"].read_text().replace("e", "E", 3))
    out = root / "run"
    run = dict(model=m["target"], teachers=[m["teachers"][0], t2], data=m["corpus"], top_k=4, max_steps=2, save_every=1, **OPTS)
    distill(run["model"], run["teachers"], run["data"], out, **{k: v for k, v in run.items() if k not in ("model", "teachers", "data")},
            stop_after=1)
    assert len(metrics(out)) == 1 and not (out / "fusekit_train.json").exists()
    return {"out": out, "run": run, "t2": t2, "other_t2": other_t2, "other_corpus": other_corpus}


def resume(r: dict, **change):
    run = {**r["run"], **change}
    model, teachers, data = run.pop("model"), run.pop("teachers"), run.pop("data")
    return distill(model, teachers, data, r["out"], resume=True, **run)


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda r: {"teachers": r["run"]["teachers"][:1]}, lambda r: f"teacher_2: '{r['t2'].resolve()} (weights "),
        (lambda r: {"data": r["other_corpus"]}, lambda r: "corpus: '6 records, fingerprint "),
        (lambda r: {"top_k": 8}, lambda r: "top_k: 4 → 8"),
        (lambda r: {"on_policy_ratio": 0.5}, lambda r: "on_policy_ratio: 0.0 → 0.5"),
        (lambda r: {"loss": "kl"}, lambda r: "loss: None → 'kl'"),
    ],
    ids=["teacher", "corpus", "top_k", "policy", "loss"],
)
def test_resume_with_a_changed_setting_stops_before_any_step(interrupted, change, says):
    r = interrupted
    with pytest.raises(TrainError) as err:
        resume(r, **change(r))
    message = str(err.value)
    assert says(r) in message, message
    assert "resume with the same options or use another --out" in message
    assert len(metrics(r["out"])) == 1  # no step was taken


def test_resume_with_a_teachers_weights_changed_in_place_is_refused(interrupted, tmp_path):
    """Same path, other weights: the weight fingerprint tells them apart (the path alone would not)."""
    r = interrupted
    saved = tmp_path / "t2-saved"
    shutil.copytree(r["t2"], saved)
    try:
        shutil.copy(r["other_t2"] / "model.safetensors", r["t2"] / "model.safetensors")
        with pytest.raises(TrainError) as err:
            resume(r)
        before, after = str(err.value).split("teacher_2: ")[1].split(" → ")[:2]
        path = str(r["t2"].resolve())
        assert before.startswith(f"'{path} (weights ") and after.startswith(f"'{path} (weights ")
        assert before.split("weights ")[1][:16] != after.split("weights ")[1][:16]
    finally:
        shutil.copy(saved / "model.safetensors", r["t2"] / "model.safetensors")
    assert len(metrics(r["out"])) == 1


def test_resume_with_the_same_settings_continues_and_a_finished_run_still_refuses_changes(interrupted):
    """The identity is the same on every invocation (the run finishes), and a finished run checks it too."""
    r = interrupted
    resume(r)
    assert [m["step"] for m in metrics(r["out"])] == [1, 2]
    done = json.loads((r["out"] / "fusekit_train.json").read_text())
    assert done["config"]["top_k"] == 4 and done["config"]["transfer"] == "bytespan"
    with pytest.raises(TrainError, match="top_k: 4 → 5"):
        resume(r, top_k=5)


def test_cli_resume_with_another_teacher_is_one_error_line(interrupted, online_models):
    from typer.testing import CliRunner

    from fusekit.cli import app

    r = interrupted
    args = ["distill", "-m", str(r["run"]["model"]), "-t", str(online_models["teachers"][0]), "-t", str(r["other_t2"]),
            "-d", str(r["run"]["data"]), "-o", str(r["out"]), "--top-k", "4", "--max-length", "32", "--batch-size", "1",
            "--max-steps", "2", "--lam", "0.5", "--lr", "1e-3", "--resume", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "teacher_2:" in errors[0] and str(r["other_t2"].resolve()) in errors[0]
    assert "use another --out" in errors[0]


def test_model_card_lists_teachers_loss_lambda_fusion_and_policy(online_models, tmp_path):
    m = online_models
    out = distill(m["target"], m["teachers"], m["corpus"], tmp_path / "card", top_k=4, max_steps=1, fusion="avg_ce",
                  granularity="token", loss="jsd", jsd_beta=0.3, on_policy_ratio=0.5, prompt_share=0.25, **OPTS)
    meta, body = read_card(out)
    assert {"online-distillation", "mixed", "avg-ce"} <= set(meta["tags"])
    teachers = body.split("## Teachers")[1].split("<!--")[0]
    rows = [line for line in teachers.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    for row, teacher in zip(rows, m["teachers"]):
        kind = json.loads((teacher / "tokenizer.json").read_text())["model"]["type"]
        vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`{teacher}`" and cells[1].startswith(kind) and cells[2] == str(vocab) and cells[3] == "4"
    about = body.split("<!-- fusekit:about -->")[1].split("<!--")[0]
    assert "λ = 0.5" in about and "`jsd`" in about and "β = 0.3" in about and "AvgCE" in about and "each token" in about
    assert "50% of the micro-batches" in about and "first 25%" in about
    assert "| on_policy_ratio | `0.5` |" in body and "| loss | `jsd` |" in body


@pytest.mark.slow  # two torchrun processes importing torch: ~40 s on a shared 2-core machine
def test_fsdp2_on_two_processes_gives_the_losses_of_one(online_models, tmp_path):
    """`fusekit distill --fsdp` under torchrun (gloo, 2 CPU ranks): the target is sharded (the checkpoint is
    written in per-rank parts), each rank runs its own whole teachers over its own windows' texts, and the
    losses equal one process reading both ranks' micro-batches (grad_accum 2).

    Tolerances: step 1 runs both on the same initial weights, so its loss differs only by the order of the
    fp32 sums (per rank, then the all-reduce of the two ranks' sums): 1e-6 relative is ~10 float32 ulps.
    Step 2 also carries the first update, whose gradients FSDP2 reduce-scatters in another order than one
    process accumulates them: 1e-5, as the DDP test allows."""
    import os
    import subprocess
    import sys

    from fusekit.train import checkpoint as ckpt

    m = online_models
    common = ["-m", str(m["target"]), "-t", str(m["teachers"][0]), "-t", str(m["teachers"][1]), "-d", str(m["corpus"]),
              "--top-k", "4", "--max-length", "32", "--batch-size", "1", "--max-steps", "2", "--lr", "1e-3", "--lam", "0.5",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusekit.cli",
           "distill", *common, "--fsdp", "-o", str(tmp_path / "fsdp")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(its 1/2 shard under FSDP2)" in run.stderr  # the memory check counts a rank's shard of the trained state
    assert all(ckpt.is_sharded(c) for c in ckpt.list_checkpoints(tmp_path / "fsdp"))
    single = distill(m["target"], m["teachers"], m["corpus"], tmp_path / "one", top_k=4, max_length=32, batch_size=1,
                     grad_accum=2, max_steps=2, lr=1e-3, lam=0.5, progress=False)
    fsdp, one = metrics(tmp_path / "fsdp"), metrics(single)
    assert len(fsdp) == len(one) == 2
    assert [x["tokens"] for x in fsdp] == [x["tokens"] for x in one]
    for key in ("loss", "clm", "fusion"):
        assert fsdp[0][key] == pytest.approx(one[0][key], rel=1e-6), key
        assert fsdp[1][key] == pytest.approx(one[1][key], rel=1e-5), key
    card, _ = read_card(tmp_path / "fsdp")
    assert "online-distillation" in card["tags"]
