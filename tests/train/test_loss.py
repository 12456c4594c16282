"""The sparse fusion loss against a dense-target reference, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusekit.train import loss as loss_mod
from fusekit.train.loss import IGNORE, dense_fused_loss, fused_loss


def make_batch(seed: int, b=2, l=7, v=23, m=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, l, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, l), generator=g)
    labels[:, -1] = IGNORE
    labels[0, 2] = IGNORE  # a masked position (e.g. a user turn in chat data)
    ids = torch.randint(0, v, (b, l, m), generator=g)
    ids[..., 1] = ids[..., 0]  # a repeated id within a row is summed, as the dense scatter does
    ids[0, 0, 3:] = -1
    probs = torch.rand(b, l, m, generator=g)
    probs[ids < 0] = 0
    probs = probs / probs.sum(-1, keepdim=True)
    return logits, labels, ids, probs


def slow_reference(logits, labels, ids, probs, lam):
    """Position by position with Python loops: λ·(−log q[y]) + (1−λ)·(−Σ p·log q[id])."""
    total = 0.0
    logq = torch.log_softmax(logits.double(), -1)
    for bi in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[bi, t])
            if y == IGNORE:
                continue
            total += lam * -float(logq[bi, t, y])
            for i, p in zip(ids[bi, t].tolist(), probs[bi, t].tolist()):
                if i >= 0:
                    total += (1 - lam) * -p * float(logq[bi, t, i])
    return total


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9])
def test_sparse_equals_dense_in_value_and_gradient(lam):
    logits, labels, ids, probs = make_batch(0)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    sparse = fused_loss(a, labels, ids, probs, lam)
    dense = dense_fused_loss(b, labels, ids, probs, lam)
    assert sparse.total.item() == pytest.approx(slow_reference(logits, labels, ids, probs, lam), rel=1e-5)
    torch.testing.assert_close(sparse.total, dense.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.clm, dense.clm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.fusion, dense.fusion, rtol=1e-5, atol=1e-5)
    (sparse.total * 1.7).backward()
    (dense.total * 1.7).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    # A position without a label gets no gradient at all, whatever its fusion target.
    assert torch.count_nonzero(a.grad[0, 2]) == 0 and torch.count_nonzero(a.grad[:, -1]) == 0


def test_bf16_logits_in_chunks(monkeypatch):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 23 * 3)  # three rows a chunk: several chunks
    logits, labels, ids, probs = make_batch(1, dtype=torch.bfloat16)
    a = logits.clone().requires_grad_()
    b = logits.float().requires_grad_()
    sparse = fused_loss(a, labels, ids, probs, 0.5)
    dense = dense_fused_loss(b, labels, ids, probs, 0.5)
    torch.testing.assert_close(sparse.total, dense.total, rtol=1e-5, atol=1e-4)
    sparse.total.backward()
    dense.total.backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-2)


def test_lambda_one_is_plain_cross_entropy_and_ignores_the_target():
    logits, labels, ids, probs = make_batch(2)
    a = logits.clone().requires_grad_()
    got = fused_loss(a, labels, ids, probs, 1.0)
    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert torch.equal(got.total, want)
    got.total.backward()
    want.backward()
    assert torch.equal(a.grad, ref.grad)
    assert torch.equal(fused_loss(logits, labels, None, None, 1.0).total, got.total.detach())


def test_bad_lambda():
    logits, labels, ids, probs = make_batch(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fused_loss(logits, labels, ids, probs, 1.5)
    with pytest.raises(ValueError, match="needs target_ids"):
        fused_loss(logits, labels, None, None, 0.9)
