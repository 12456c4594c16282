"""`fusekit extract` on tiny real transformers models: what is stored is what the model computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fusekit
from fusekit import zoo
from fusekit.extract import CorpusError, ExtractError, ExtractStore, ModelLoadError, StoreError

STEP = 0.125
FINE = 1 / 256
WINDOW = 24


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    return [t.replace("\n", " ")[:220] for t in corpus_texts[:9]]


@pytest.fixture(scope="module")
def corpus_file(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "d.txt"
    path.write_text("\n".join(texts) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tokenizers_by_kind, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "gpt2", hidden=32, context=128),
        "llama": zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], root / "llama", hidden=32, context=128, seed=1),
        "gpt_neox": zoo.build_tiny_model(
            "gpt_neox", tokenizers_by_kind["wordpiece"], root / "neox", hidden=32, context=128, seed=2, pad_vocab_to=850
        ),
    }


def direct(model_dir, ids: np.ndarray):
    """The model's own log-softmax over one window, and HF's shifted loss."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        out = net(input_ids=x, labels=x if len(ids) > 1 else None)
    return torch.log_softmax(out.logits[0].double(), -1), (float(out.loss) if len(ids) > 1 else float("nan"))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_stored_topk_and_ce_are_the_models_own(arch, models, corpus_file, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fusekit.run_extract(models[arch], corpus_file, tmp_path / "s", top_k=6, max_length=WINDOW, batch_size=3, progress=False).out
    store = ExtractStore(out)
    assert store.complete() and store.k == 6 and store.n_texts == len(texts)
    tok = AutoTokenizer.from_pretrained(models[arch])
    net = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    assert len(store.vocab) == net.config.vocab_size
    seen = []
    for text_id, windows in store.iter_texts():
        seen.append(text_id)
        text = texts[text_id]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        # Every plain text ends with the end-of-sequence token, placed after its last character.
        assert tok.eos_token_id is not None
        np.testing.assert_array_equal(np.concatenate([w.input_ids for w in windows]), enc["input_ids"] + [tok.eos_token_id])
        np.testing.assert_array_equal(np.concatenate([w.offsets for w in windows]), [s for s, _ in enc["offset_mapping"]] + [len(text)])
        assert [w.window for w in windows] == list(range(len(windows)))
        assert windows[0].char_start == 0 and windows[-1].char_end == len(text)
        assert "".join(w.text for w in windows) == text  # each window keeps its text
        for a, b in zip(windows, windows[1:]):
            assert a.char_end == b.char_start
        for w in windows:
            x = torch.as_tensor(w.input_ids)[None]
            with torch.no_grad():
                o = net(input_ids=x, labels=x if x.shape[1] > 1 else None)
            logp = torch.log_softmax(o.logits[0].double(), -1).numpy()
            order = np.argsort(-logp, axis=1, kind="stable")
            top = np.take_along_axis(logp, order[:, :7], axis=1)
            for t in range(len(w.input_ids)):
                clear = top[t, :6] - top[t, 1:7] > 1e-5  # slots with no near-tie below them
                np.testing.assert_array_equal(w.topk_ids[t][clear], order[t, :6][clear])
            np.testing.assert_allclose(w.topk_logp, top[:, :6], atol=STEP + FINE)
            assert np.isnan(w.ce[-1])
            if len(w.input_ids) > 1:
                want_ce = -logp[np.arange(len(w.input_ids) - 1), w.input_ids[1:]]
                np.testing.assert_allclose(w.ce[:-1], want_ce, atol=FINE / 2 + 1e-5)
                assert w.mean_ce == pytest.approx(float(o.loss), rel=1e-5)
    assert seen == sorted(seen) and len(seen) == len(texts)
    assert store.window_count() == sum(1 for _ in store.iter_windows())
    assert store.token_count() == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert store.vocab_info.eos == tok.eos_token_id


def test_padded_embedding_gets_unique_placeholders(models, corpus_file, tmp_path, tokenizers_by_kind):
    store = ExtractStore(fusekit.run_extract(models["gpt_neox"], corpus_file, tmp_path / "s", top_k=3, max_length=WINDOW, progress=False).out)
    n_tok = len(tokenizers_by_kind["wordpiece"])
    assert store.vocab_size == len(store.vocab) == 850 > n_tok
    pads = store.vocab[n_tok:]
    assert len(set(pads)) == len(pads) and not set(pads) & set(store.vocab[:n_tok])
    assert store.scheme == "wordpiece"


def test_tokenizer_larger_than_the_model_is_refused(tokenizers_by_kind, corpus_file, tmp_path):
    from transformers import AutoTokenizer

    path = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], tmp_path / "m", hidden=32, context=64)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(path)
    with pytest.raises(ExtractError, match="tokenizer has .* tokens but the model predicts only"):
        fusekit.run_extract(path, corpus_file, tmp_path / "s", progress=False).out


def test_shards_cover_each_text_once_and_match_the_unsharded_run(models, corpus_file, tmp_path):
    whole = ExtractStore(fusekit.run_extract(models["llama"], corpus_file, tmp_path / "whole", top_k=4, max_length=WINDOW, num_shards=1, progress=False).out)
    for i in (2, 0, 1):  # any order, as independent jobs would
        fusekit.run_extract(models["llama"], corpus_file, tmp_path / "split", top_k=4, max_length=WINDOW, shard=f"{i}/3", progress=False).out
        if i == 2:
            assert not ExtractStore(tmp_path / "split").complete()
    split = ExtractStore(tmp_path / "split")
    assert split.complete()
    ids = [tid for tid, _ in split.iter_texts()]
    assert ids == list(range(split.n_texts))
    for (ta, wa), (tb, wb) in zip(whole.iter_texts(), split.iter_texts()):
        assert ta == tb and len(wa) == len(wb)
        for a, b in zip(wa, wb):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.offsets, b.offsets)
            assert (a.char_start, a.char_end) == (b.char_start, b.char_end)
            # other batch shapes may move a float's last bit: a slot's grid cell at most
            assert (a.topk_ids == b.topk_ids).mean() > 0.98
            np.testing.assert_allclose(a.topk_logp, b.topk_logp, atol=STEP + FINE)
    assert whole.corpus_fingerprint == split.corpus_fingerprint
    # a slice of texts reads only what it asks for
    part = list(split.iter_texts(range(2, 5)))
    assert [t for t, _ in part] == [2, 3, 4]


def test_chat_records_keep_the_assistant_mask(models, tmp_path):
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "what is a list"}, {"role": "assistant", "content": "a mutable sequence of items"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"text": "plain text here"}) + "\n")
    store = ExtractStore(fusekit.run_extract(models["gpt2"], tmp_path / "c.jsonl", tmp_path / "s", top_k=3, max_length=8, progress=False).out)
    (t0, chat_windows), (t1, plain_windows) = list(store.iter_texts())
    mask = np.concatenate([w.loss_mask for w in chat_windows])
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    rendered = "user: what is a list\nassistant: a mutable sequence of items\n"  # the template-less rendering
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    start = rendered.index("assistant:")
    np.testing.assert_array_equal(mask, [s >= start for s, _ in enc["offset_mapping"]])
    assert all(w.loss_mask is None for w in plain_windows)


def test_non_utf8_and_empty_lines_are_skipped_and_counted(models, tmp_path, texts):
    data = tmp_path / "d.txt"
    data.write_bytes(texts[0].encode() + b"\n\n   \n" + b"caf\xe9 latin-1\n" + texts[1].encode() + b"\n")
    store = ExtractStore(fusekit.run_extract(models["gpt2"], data, tmp_path / "s", top_k=2, max_length=WINDOW, progress=False).out)
    assert store.n_texts == 2
    assert store.manifest["corpus"] == {"texts": 2, "skipped_empty": 2, "skipped_non_utf8": 1}


def test_bad_input_is_a_clear_error(models, corpus_file, tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        fusekit.run_extract(tmp_path / "nope", corpus_file, tmp_path / "s", progress=False).out
    with pytest.raises(CorpusError, match="no data at"):
        fusekit.run_extract(models["gpt2"], tmp_path / "nope.txt", tmp_path / "s", progress=False).out
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="no texts in .*skipped 2 empty"):
        fusekit.run_extract(models["gpt2"], tmp_path / "empty.txt", tmp_path / "s", progress=False).out
    with pytest.raises(StoreError, match="I/N"):
        fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "s", shard="3", progress=False).out
    with pytest.raises(StoreError, match="0..1"):
        fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "s", shard="2/2", progress=False).out
    with pytest.raises(ExtractError, match="some shards would be empty"):
        fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "s", num_shards=50, progress=False).out
    with pytest.raises(ExtractError, match="top-k"):
        fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "s", top_k=0, progress=False).out
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and not a fusekit store"):
        fusekit.run_extract(models["gpt2"], corpus_file, busy, progress=False).out
    with pytest.raises(StoreError, match="no extraction store"):
        ExtractStore(tmp_path / "missing")


def test_other_settings_and_foreign_shards_are_refused(models, corpus_file, tmp_path):
    a = fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "a", top_k=3, max_length=WINDOW, num_shards=2, progress=False).out
    with pytest.raises(StoreError, match=r"other settings \(k: store has 3, this run 4"):
        fusekit.run_extract(models["gpt2"], corpus_file, a, top_k=4, max_length=WINDOW, num_shards=2, progress=False).out
    with pytest.raises(StoreError, match="model_fingerprint"):
        fusekit.run_extract(models["llama"], corpus_file, a, top_k=3, max_length=WINDOW, num_shards=2, progress=False).out
    b = fusekit.run_extract(models["gpt2"], corpus_file, tmp_path / "b", top_k=3, max_length=WINDOW + 1, num_shards=2, shard="0/2", progress=False).out
    # a shard of run a copied into run b: its sidecar's settings differ
    for suffix in ("", ".json"):
        (b / f"part-00001-of-00002.parquet{suffix}").write_bytes((a / f"part-00001-of-00002.parquet{suffix}").read_bytes())
    with pytest.raises(StoreError, match="part-00001-of-00002.parquet has a sidecar from another extraction run"):
        fusekit.run_extract(models["gpt2"], corpus_file, b, top_k=3, max_length=WINDOW + 1, num_shards=2, progress=False).out
    # without its sidecar, the file's own metadata gives it away
    (b / "part-00001-of-00002.parquet.json").unlink()
    with pytest.raises(StoreError, match="part-00001-of-00002.parquet belongs to another extraction run"):
        fusekit.run_extract(models["gpt2"], corpus_file, b, top_k=3, max_length=WINDOW + 1, num_shards=2, progress=False).out
