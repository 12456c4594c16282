"""--gradient-checkpointing: the same loss and gradients, the blocks really recomputed, a clear refusal."""

from __future__ import annotations

import pytest
import torch

from fusekit import zoo
from fusekit.train.activation_checkpointing import enable_activation_checkpointing
from fusekit.train.config import TrainConfigError
from fusekit.train.head import FusionStep
from test_loss import make_batch


def _step_results(lm, fused: bool, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    input_ids, position_ids, labels, ids, probs = batch
    lm.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in every run (GPT-2 has dropout)
    total, _, _ = FusionStep(lm, fused)(input_ids, position_ids, labels, ids, probs, 0.7)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointing_keeps_the_loss_and_every_gradient(arch, tokenizers_by_kind, tmp_path):
    """Each block's forward runs twice (counted), and the loss and every parameter's gradient are those of a
    plain step, through the fused head and through the logits path — with dropout (GPT-2's), whose masks the
    recomputation draws again from the saved RNG state."""
    from transformers import AutoModelForCausalLM

    tok = tokenizers_by_kind["bpe"]
    lm = AutoModelForCausalLM.from_pretrained(zoo.build_tiny_model(arch, tok, tmp_path / "m", hidden=32, layers=2))
    lm.train()  # checkpointing is active in training mode only
    v = lm.get_output_embeddings().weight.shape[0]
    _, labels, ids, probs = make_batch(3, b=2, l=12, v=v, m=4)
    input_ids = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(7))
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, 12)  # two packed windows a row
    batch = (input_ids, position_ids, labels, ids, probs)
    plain = {fused: _step_results(lm, fused, batch) for fused in (True, False)}

    enable_activation_checkpointing(lm)
    blocks = [m for m in lm.modules() if type(m).__name__ in lm._no_split_modules]
    calls = []
    for block in blocks:  # a sub-module: the recomputation re-runs the block's forward, not its own hooks
        next(block.children()).register_forward_pre_hook(lambda *_: calls.append(1))
    for fused in (True, False):
        calls.clear()
        loss, grads = _step_results(lm, fused, batch)
        assert len(calls) == 2 * len(blocks)  # the forward, then the recomputation in backward
        want_loss, want_grads = plain[fused]
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_class_without_checkpointing_is_named():
    """JetMoe's transformers class declares no activation checkpointing: one line naming the class."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
                          intermediate_size=32, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(TrainConfigError, match="JetMoeForCausalLM does not support activation checkpointing") as err:
        enable_activation_checkpointing(JetMoeForCausalLM(config))
    assert "\n" not in str(err.value)
