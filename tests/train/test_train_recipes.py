"""The papers' recipes as presets, λ schedules, teacher temperature, and checkpoints that cannot run code."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import fusekit
from fusekit import zoo
from fusekit.train import TrainConfigError, TrainDataError, TrainError, build_config
from fusekit.train.examples import with_temperature
from fusion_data import random_window


@pytest.fixture(scope="module")
def tiny(tokenizers_by_kind, tmp_path_factory):
    tok = tokenizers_by_kind["bpe"]
    root = tmp_path_factory.mktemp("recipes")
    model = zoo.build_tiny_model("llama", tok, root / "model", hidden=32)
    rng = np.random.default_rng(0)
    windows = [random_window(rng, n=16, k=3, vocab=len(tok), sources=1, text_id=i) for i in range(8)]
    return model, windows


FAST = dict(batch_size=1, max_length=16, progress=False, lr=1e-3)


def test_presets_are_the_papers_recipes_and_options_override_them(tmp_path):
    fusellm = build_config()
    assert (fusellm.preset, fusellm.lam, fusellm.lr, fusellm.epochs, fusellm.weight_decay) == ("fusellm", 0.9, 1e-5, 1.0, 0.1)
    assert (fusellm.warmup_ratio, fusellm.betas, fusellm.loss_on) == (0.008, (0.9, 0.95), "all")
    chat = build_config(preset="fusechat")
    assert (chat.lr, chat.epochs, chat.weight_decay, chat.warmup_ratio) == (5e-6, 3.0, 0.0, 0.03)
    assert chat.betas == (0.9, 0.999) and chat.loss_on == "assistant"  # HF AdamW's default β2
    assert build_config(preset="fusechat", lr=1e-4, loss_on="all").lr == 1e-4
    (tmp_path / "t.yaml").write_text("preset: fusechat\nepochs: 2\n")
    from_file = build_config(tmp_path / "t.yaml")
    assert (from_file.lr, from_file.epochs) == (5e-6, 2.0)
    assert build_config(tmp_path / "t.yaml", preset="fusellm").lr == 1e-5  # the flag's preset wins
    with pytest.raises(TrainConfigError, match="unknown preset 'fusechat2'"):
        build_config(preset="fusechat2")


def test_lambda_schedules_by_hand():
    assert [build_config(lam=0.9, lam_schedule="hard_and_decay").lam_at(t, 4) for t in range(4)] == pytest.approx(
        [0.9, 0.925, 0.95, 0.975]
    )
    assert [build_config(lam=0.5, lam_schedule="linear", lam_end=0.9).lam_at(t, 4) for t in range(4)] == pytest.approx(
        [0.5, 0.6, 0.7, 0.8]
    )
    assert build_config(lam=0.7).lam_at(3, 4) == 0.7
    assert build_config(lam=1.0, lam_schedule="linear", lam_end=0.5).uses_target
    assert not build_config(lam=1.0, lam_schedule="hard_and_decay").uses_target


def test_teacher_temperature_by_hand_and_as_softmax_of_scaled_logits():
    p = np.array([[0.5, 0.25, 0.25, 0.0], [0.4, 0.4, 0.0, 0.0], [0, 0, 0, 0]], dtype=np.float32)
    got = with_temperature(p, 2.0)
    r = np.sqrt([0.5, 0.25, 0.25])
    np.testing.assert_allclose(got[0, :3], r / r.sum(), rtol=1e-6)
    np.testing.assert_allclose(got[1], [0.4, 0.4, 0, 0], rtol=1e-6)  # mass 0.8 kept, equal probs stay equal
    assert got[0, 3] == 0 and not got[2].any()
    assert with_temperature(p, 1.0) is p
    logits = np.random.default_rng(0).normal(size=(5, 6)) * 3
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in (0.5, 3.0):
        want = np.exp(logits / t) / np.exp(logits / t).sum(-1, keepdims=True)
        np.testing.assert_allclose(with_temperature(soft.astype(np.float32), t), want, rtol=1e-5, atol=1e-7)


def test_schedule_and_temperature_reach_the_loss(tiny, tmp_path):
    """Each logged loss is λ_t·clm + (1 − λ_t)·fusion with the hand-computed λ_t; T changes the fusion term."""
    model, windows = tiny
    run = lambda out, **kw: [json.loads(x) for x in (fusekit.run_train(model, windows, tmp_path / out, **FAST, **kw).out
                                                       / "metrics.jsonl").read_text().splitlines()]
    log = run("decay", lam=0.6, lam_schedule="hard_and_decay", max_steps=4)
    assert [m["lam"] for m in log] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    for m in log:
        assert m["loss"] == pytest.approx(m["lam"] * m["clm"] + (1 - m["lam"]) * m["fusion"], rel=1e-5)
    # First step, no shuffling: window 0 alone. Its fusion term by a position loop over the model's log-probs.
    from transformers import AutoModelForCausalLM

    from fusekit.fuse import fuse_window

    lm = AutoModelForCausalLM.from_pretrained(model)
    w = windows[0]
    with torch.no_grad():
        logq = torch.log_softmax(lm(torch.as_tensor(w.input_ids)[None]).logits[0].double(), -1)
    fused = fuse_window(w, "min_ce", "window")
    for t in (1.0, 4.0):
        probs = with_temperature(fused.probs[:-1].astype(np.float32), t)
        want = -sum(p * float(logq[i, j]) for i in range(len(probs)) for j, p in zip(fused.ids[i], probs[i]) if j >= 0)
        got = run(f"t{t}", lam=0.6, teacher_temperature=t, max_steps=1, shuffle=False)[0]
        assert got["fusion"] == pytest.approx(want / (len(w.input_ids) - 1), rel=1e-5)


def test_fusechat_preset_refuses_windows_without_assistant_mask(tiny, tmp_path):
    model, windows = tiny
    with pytest.raises(TrainDataError, match="no loss_mask.*assistant tokens only"):
        fusekit.run_train(model, windows, tmp_path / "chat", preset="fusechat", max_steps=1, **FAST).out


class _Payload:
    """Unpickling this creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_pickled_state_that_would_run_code(tiny, tmp_path):
    model, windows = tiny
    out = tmp_path / "run"
    fusekit.run_train(model, windows, out, lam=0.8, stop_after=1, **FAST).out
    ckpt = out / "checkpoints" / "step-00000001"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "rng-rank0.safetensors").is_file()
    assert not list(ckpt.glob("*.pt"))
    # The payload is live: plain unpickling runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"optimizer": _Payload(probe)}))
    assert probe.exists()
    marker = tmp_path / "pwned"
    for name in ("trainer_state", "rng-rank0"):
        (ckpt / f"{name}.json").unlink()
        (ckpt / f"{name}.safetensors").unlink()
        torch.save({"step": 1, "payload": _Payload(marker)}, ckpt / f"{name}.pt")
    with pytest.raises(TrainError, match="trainer_state.pt.*can run code"):
        fusekit.run_train(model, windows, out, lam=0.8, resume=True, **FAST).out
    assert not marker.exists()


def test_fusechat_configs_train_with_fusechat_recipe_and_recipes_with_fusellm():
    from fusekit.fusechat import FuseChatRecipe
    from fusekit.recipe import TrainOptions

    spec = {"workdir": "w", "pivot": {"name": "p", "model": "p"}, "sources": [{"name": "s", "model": "s"}],
            "corpus": {"name": "c", "data": "c.jsonl"}}
    for train_block in ({}, {"train": {"lr": 1e-4}}):
        recipe = FuseChatRecipe.model_validate({**spec, **train_block}).as_recipe()
        cfg = build_config(**{k: v for k, v in recipe.train.model_dump().items() if k not in ("variants",)})
        assert (cfg.preset, cfg.epochs, cfg.weight_decay, cfg.loss_on) == ("fusechat", 3.0, 0.0, "assistant")
        assert cfg.lr == train_block.get("train", {}).get("lr", 5e-6)
    assert TrainOptions().preset is None and build_config(preset=TrainOptions().preset).preset == "fusellm"


def test_recipe_train_options_resolve_unset_values_from_their_preset():
    from fusekit.recipe import TrainOptions

    assert TrainOptions().resolved("epochs") == 1.0 and TrainOptions(preset="fusechat").resolved("epochs") == 3.0
    assert TrainOptions(preset="fusechat", epochs=0.5).resolved("epochs") == 0.5
    assert TrainOptions().resolved("lam_schedule") == "constant"


def test_gradient_checkpointing_is_a_recipe_key_and_a_resumable_option():
    """Off unless asked (presets included); it changes memory, not the run, so a resume may switch it."""
    from fusekit.recipe import TrainOptions

    def options(train: TrainOptions) -> dict:
        return {k: v for k, v in train.model_dump().items() if k != "variants"}

    assert build_config(**options(TrainOptions())).gradient_checkpointing is False
    for preset in ("fusellm", "fusechat"):
        assert build_config(preset=preset).gradient_checkpointing is False
    on = build_config(**options(TrainOptions.model_validate({"gradient_checkpointing": True})))
    assert on.gradient_checkpointing is True and "gradient_checkpointing" not in on.identity()
    assert build_config(fsdp=True, fsdp_offload=True).identity() == build_config().identity()


def test_safe_state_round_trips_plain_values_and_tensors_and_refuses_objects(tmp_path):
    import random

    from fusekit.train.safe_state import UnsafeStateError, load_state, save_state

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "t": torch.arange(5, dtype=torch.int16),
             "opt": {0: {"step": torch.tensor(3.0)}}, "tag": {"__tuple__": 1}, "x": (1, None, "a", 2.5)}
    save_state(tmp_path / "s", state)
    back = load_state(tmp_path / "s")
    assert back["python"] == state["python"] and back["x"] == state["x"] and back["tag"] == {"__tuple__": 1}
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][1].dtype == np.uint32
    assert torch.equal(back["t"], state["t"]) and torch.equal(back["opt"][0]["step"], torch.tensor(3.0))
    with pytest.raises(UnsafeStateError, match="cannot save a _Payload"):
        save_state(tmp_path / "bad", {"p": _Payload(tmp_path / "never")})
