"""The fused output layer + loss against the dense formulation (logits, then the loss), values and gradients."""

from __future__ import annotations

import pytest
import torch

from fusekit import zoo
from fusekit.train.head import FusionStep, head_problem
from fusekit.train.linear_loss import linear_fusion_loss
from fusekit.train.loss import dense_fused_loss
from test_loss import make_batch


def hidden_batch(seed: int, b=2, l=7, v=23, h=6, m=5):
    g = torch.Generator().manual_seed(seed + 100)
    _, labels, ids, probs = make_batch(seed, b, l, v, m)
    hidden = torch.randn(b, l, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.7
    bias = torch.randn(v, generator=g)
    return hidden, weight, bias, labels, ids, probs


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("chunk_elements", [23 * 3, None])  # three positions a chunk; one chunk
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_head_equals_dense_logits_loss(lam, chunk_elements, with_bias):
    hidden, weight, bias, labels, ids, probs = hidden_batch(0)
    bias = bias if with_bias else None
    leaves_a = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    leaves_b = [t.detach().clone().requires_grad_() for t in leaves_a]
    ha, wa, *ba = leaves_a
    hb, wb, *bb = leaves_b
    got = linear_fusion_loss(ha, wa, ba[0] if ba else None, labels, ids, probs, lam, chunk_elements=chunk_elements)
    logits = hb @ wb.t() + (bb[0] if bb else 0)
    want = dense_fused_loss(logits, labels, ids, probs, lam)
    for a, b in ((got.total, want.total), (got.clm, want.clm), (got.fusion * (lam < 1), want.fusion * (lam < 1))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (got.total * 1.7).backward()
    (want.total * 1.7).backward()
    for a, b in zip(leaves_a, leaves_b):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    # Positions without a label pass no gradient back to the hidden state.
    assert torch.count_nonzero(ha.grad[0, 2]) == 0 and torch.count_nonzero(ha.grad[:, -1]) == 0


def test_bf16_autocast_matches_fp32_reference():
    hidden, weight, bias, labels, ids, probs = hidden_batch(1, v=64, h=16)
    a = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_fusion_loss(a.to(torch.bfloat16), w, None, labels, ids, probs, 0.5, chunk_elements=64 * 4)
    got.total.backward()
    b = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    want = dense_fused_loss(b @ w2.t(), labels, ids, probs, 0.5)
    want.total.backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(got.total, want.total, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, w2.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-2)


def test_no_gradient_needed_gives_values_only():
    hidden, weight, bias, labels, ids, probs = hidden_batch(2)
    with torch.no_grad():
        got = linear_fusion_loss(hidden, weight, bias, labels, ids, probs, 0.4)
    want = dense_fused_loss(hidden @ weight.t() + bias, labels, ids, probs, 0.4)
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-5)


def test_bad_input():
    hidden, weight, bias, labels, ids, probs = hidden_batch(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        linear_fusion_loss(hidden, weight, bias, labels, ids, probs, -0.1)
    with pytest.raises(ValueError, match="needs target_ids"):
        linear_fusion_loss(hidden, weight, bias, labels, None, None, 0.5)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_fusion_step_fused_equals_logits_path_on_real_models(arch, tied, tokenizers_by_kind, tmp_path):
    """A real tiny model, tied and untied embeddings: same loss and same gradient on every parameter."""
    from transformers import AutoModelForCausalLM

    tok = tokenizers_by_kind["bpe"]
    path = zoo.build_tiny_model(arch, tok, tmp_path / "m", seed=0, hidden=32)
    lm = AutoModelForCausalLM.from_pretrained(path)
    if tied != lm.config.tie_word_embeddings:
        lm.config.tie_word_embeddings = tied
        lm.tie_weights()
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == tied
    lm.eval()  # no dropout: both passes see the same network
    assert head_problem(lm, torch.device("cpu")) is None
    v = lm.get_output_embeddings().weight.shape[0]
    _, labels, ids, probs = make_batch(4, b=2, l=9, v=v, m=6)
    input_ids = torch.randint(0, v, (2, 9), generator=torch.Generator().manual_seed(5))
    position_ids = torch.cat([torch.arange(5), torch.arange(4)]).expand(2, 9)  # two packed windows a row
    results = []
    for fused in (True, False):
        lm.zero_grad(set_to_none=True)
        total, clm, fusion = FusionStep(lm, fused)(input_ids, position_ids, labels, ids, probs, 0.7)
        total.backward()
        results.append((total.detach(), clm, fusion, {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (ta, ca, fa, ga), (tb, cb, fb, gb) = results
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_transforms_its_logits_is_caught(tokenizers_by_kind):
    """Gemma-2 soft-caps logits after the head: the fused head would be wrong, so it is refused — by its
    config even at the real cap of 30, where a small random model's logits (< 1) change by less than the
    probe's tolerance; a transform no config field names is caught by the probe."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from fusekit.models.head import head_mismatch, head_probe, probe_ids

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    lm = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        logits, again = head_probe(lm, lm.get_output_embeddings(), probe_ids(lm, torch.device("cpu")))
    assert float(logits.abs().max()) < 1 and head_mismatch(logits, again) is None  # the probe alone misses it
    assert head_problem(lm, torch.device("cpu")) == (
        "its logits are not the output layer's: final_logit_softcapping = 30.0 transforms them after it")
    config.final_logit_softcapping = None
    assert head_problem(Gemma2ForCausalLM(config), torch.device("cpu")) is None

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    doubled = Doubled(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
    assert "transforms" in head_problem(doubled, torch.device("cpu"))


def test_loop_falls_back_to_logits_with_a_warning_or_refuses_when_asked(tmp_path):
    import numpy as np
    from transformers import Gemma2Config, Gemma2ForCausalLM

    import fusekit
    from fusekit.train import TrainConfigError
    from fusion_data import random_window

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    rng = np.random.default_rng(0)
    windows = [random_window(rng, n=12, k=3, vocab=64, sources=1, text_id=i) for i in range(2)]
    kw = dict(lam=0.5, batch_size=1, max_length=12, max_steps=1, progress=False)
    with pytest.raises(TrainConfigError, match="fused_head on: Gemma2ForCausalLM: its logits are not"):
        fusekit.run_train(tmp_path / "gemma2", windows, tmp_path / "on", fused_head="on", **kw).out
    with pytest.warns(UserWarning, match="training through full \\[B, L, V\\] logits"):
        out = fusekit.run_train(tmp_path / "gemma2", windows, tmp_path / "auto", **kw).out
    assert (out / "model.safetensors").is_file()
