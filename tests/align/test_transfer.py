"""The byte-span transfer on real tokenizers: self-identity, a slow reference, perfect-source recall,
no mass on ids a tokenizer never emits, chat with two templates, end of document."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fusekit
from fusekit.align.recall import perfect_source_topk, recalled
from fusekit.align.remap import remap_spans
from fusekit.align.transfer import TextTokens, Transferer, encode_offsets
from fusekit.vocab.info import EMPTY, SPECIAL, vocab_info

import reference
from real_tokenizers import real_tokenizer

HARD_TEXT = (
    "Tokyo 東京 and 北京 ☕😀👩‍👩‍👧 — café vs cafe\u0301, naïve Å\u030a.\r\n"
    "\tdef f(x):\r\n\t\treturn x * 1234567 + 3.14159\n"
    "    | col | 42 |   7 |\n 2024-05-17: 99% of 1,234,567\n"
)


def _random_topk(n: int, k: int, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = (rng.integers(0, vocab_size, (n, 1)) + np.arange(k) * 7919) % vocab_size  # k distinct ids a row
    logits = rng.normal(size=(n, k)) * 2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True)) - 0.05  # a top-k holds < 1 of the mass
    return ids, logp.astype(np.float32)


def _merged_expectation(info, ids_row, logp_row, normalise: bool = True) -> dict[int, float]:
    """The source's own row as the transfer must give it back onto the same tokenizer: byte-fallback twins
    onto their ordinary token, EOS kept, other specials and padded ids dropped, renormalised (or, with
    `normalise=False`, the probabilities as the source gave them)."""
    preferred: dict[str, int] = {}
    for i, (s, ok) in enumerate(zip(info.strings, info.usable.tolist())):
        if ok:
            preferred.setdefault(s, i)
    out: dict[int, float] = {}
    for v, lp in zip(ids_row.tolist(), logp_row.tolist()):
        if v in (info.eos, info.eot):
            t = v
        elif info.kind[v] in (SPECIAL, EMPTY):
            continue
        else:
            t = preferred.get(info.strings[v])
            if t is None:
                continue
        out[t] = out.get(t, 0.0) + math.exp(lp)
    total = sum(out.values()) if normalise else 1.0
    return {t: p / total for t, p in out.items()}


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "smollm2", "unigram"])
def test_a_tokenizer_onto_itself_gives_its_own_distribution_back(name, tokenizers_by_kind, request):
    if name == "smollm2":
        tok = request.getfixturevalue("smollm2_tokenizer")
    elif name == "unigram":
        tok = tokenizers_by_kind["unigram"]
    else:
        tok = real_tokenizer(name)
    src = encode_offsets(tok, HARD_TEXT)
    info = vocab_info(tok)
    ids, logp = _random_topk(len(src.ids), 6, len(info), seed=len(name))
    ids[:-1, 0] = src.ids[1:]  # the true next token among them, as a model's top-k usually has it
    ids[:-1, 1:] = np.where(ids[:-1, 1:] == ids[:-1, :1], (ids[:-1, 1:] + 1) % len(info), ids[:-1, 1:])
    out = fusekit.transfer(HARD_TEXT, tok, tok, ids, logp)
    # A special token in the text (the small Unigram's <unk> for characters it lacks) has no text to
    # transfer: the row predicting it falls back; every other row is the source's own.
    unknown = info.kind[src.ids[1:]] == SPECIAL
    assert (out.carried[:-1] == ~unknown).all() and not out.carried[-1]
    for j in np.flatnonzero(~unknown).tolist():
        got = {int(t): float(p) for t, p in zip(out.ids[j], out.probs[j]) if t >= 0}
        want = _merged_expectation(info, ids[j], logp[j])
        assert got.keys() == want.keys(), j
        for t in want:
            assert got[t] == pytest.approx(want[t], abs=1e-5)
        assert out.true_prob[j] == pytest.approx(math.exp(logp[j, 0]), rel=1e-5)
        # 1:1 everywhere: each row held the source row's top-k mass (< 1 here: the top-k leaves e^−0.05 of
        # it out), less what it dropped (specials, padding) — the source's own probability of those ids.
        assert out.mass[j] == pytest.approx(sum(_merged_expectation(info, ids[j], logp[j], normalise=False).values()), rel=1e-5)
        assert out.mass[j] < 1.0


@pytest.mark.parametrize("pair", [("gpt-2", "llama-spm"), ("llama-spm", "phi-3"), ("mpt", "llama-spm"), ("llama-spm", "gpt-2")])
def test_rust_transfer_equals_the_slow_reference(pair):
    src_tok, tgt_tok = real_tokenizer(pair[0]), real_tokenizer(pair[1])
    t = Transferer(vocab_info(src_tok), vocab_info(tgt_tok))
    text = HARD_TEXT
    src, tgt = encode_offsets(src_tok, text), encode_offsets(tgt_tok, text)
    ids, logp = _random_topk(len(src.ids), 5, len(t.source), seed=7)
    ids[::2, 0] = np.r_[src.ids[1:], 0][::2]  # the true token at every other row: chains and misses both
    (got,) = t.run([(text, src, tgt, ids, logp)], out_k=64)
    lookup: dict[bytes, int] = {}
    for i, (b, ok) in enumerate(zip(t.target.bytes, t.target.usable.tolist())):
        if ok and b and (b not in lookup or (t.target.twin[lookup[b]] and not t.target.twin[i])):
            lookup[b] = i
    want = reference.transfer(
        text.encode(), src.ids.tolist(), t.spans(text, src, t.source.bytes).tolist(), tgt.ids.tolist(), t.spans(text, tgt, t.target.bytes).tolist(),
        t.source.bytes, (t.source.eos, t.source.eot), lookup, (t.target.eos, t.target.eot), ids.tolist(), logp.tolist(),
    )
    for j, (mass, kind) in enumerate(want):
        assert got.carried[j] == (kind == "carried"), j
        if kind != "carried":
            continue
        total = sum(mass.values())
        row = {int(i): float(p) for i, p in zip(got.ids[j], got.probs[j]) if i >= 0}
        assert row.keys() == mass.keys(), j
        for i, w in mass.items():
            assert row[i] == pytest.approx(w / total, abs=1e-5)
        truth = int(tgt.ids[j + 1])
        assert got.true_prob[j] == pytest.approx(mass.get(truth, 0.0), rel=1e-4, abs=1e-9)
        # The row's mass before renormalising is the reference's unnormalised total (out_k 64 truncates nothing).
        assert got.mass[j] == pytest.approx(total, rel=1e-4, abs=1e-9)
        assert 0.0 < got.mass[j] <= 1.0 + 1e-6


def _recall(src_tok, tgt_tok, texts, method="bytespan") -> float:
    hits = total = 0
    for text in texts:
        src, tgt = encode_offsets(src_tok, text), encode_offsets(tgt_tok, text)
        ids, logp = perfect_source_topk(src.ids, 8, len(src_tok))
        r = recalled(fusekit.transfer(text, src_tok, tgt_tok, ids, logp, method=method), tgt.ids)
        hits, total = hits + int(r.sum()), total + len(r)
    return hits / total


@pytest.mark.parametrize("pair", [("gpt-2", "llama-spm"), ("mpt", "llama-spm"), ("llama-spm", "phi-3"), ("smollm2", "llama-spm")])
def test_perfect_source_recall_on_real_pairs(pair, request):
    from fusekit.align.probe_texts import probe_texts

    load = lambda n: request.getfixturevalue("smollm2_tokenizer") if n == "smollm2" else real_tokenizer(n)  # noqa: E731
    src_tok, tgt_tok = load(pair[0]), load(pair[1])
    texts = [t for kind in probe_texts().values() for t in kind[:3]]
    new = _recall(src_tok, tgt_tok, texts)
    paper = _recall(src_tok, tgt_tok, texts, method="fusellm")
    assert new >= 0.97
    assert new >= paper


def test_no_mass_on_twins_specials_or_padding():
    """A source spreading mass over every kind of id, onto Llama-2 (byte fallback, specials)."""
    src_tok, tgt_tok = real_tokenizer("gpt-neox"), real_tokenizer("llama-spm")
    tgt_info = vocab_info(tgt_tok)
    src = encode_offsets(src_tok, HARD_TEXT)
    size = len(src_tok) + 64  # a padded embedding: ids past the tokenizer are empty
    s_info = vocab_info(src_tok, size=size)
    assert (s_info.kind == EMPTY).sum() == 64
    ids, logp = _random_topk(len(src.ids), 16, size, seed=3)
    ids[:, 2] = len(src_tok) + np.arange(len(src.ids)) % 64
    special = np.flatnonzero(s_info.kind >= SPECIAL)
    ids[:, 1] = special[np.arange(len(src.ids)) % len(special)]
    ids[:-1, 0] = src.ids[1:]
    t = Transferer(s_info, tgt_info)
    (out,) = t.run([(HARD_TEXT, src, encode_offsets(tgt_tok, HARD_TEXT), ids, logp)], out_k=16)
    bad = tgt_info.twin | (tgt_info.kind == SPECIAL) | (tgt_info.kind == EMPTY)
    bad[tgt_info.eos] = False
    live = out.ids >= 0
    assert live.any() and not bad[out.ids[live]].any()
    assert tgt_info.twin.sum() >= 90  # Llama-2 has byte twins (<0x2C> and ","): they exist, and take nothing


def test_chat_rendered_by_two_templates_aligns_every_assistant_position():
    src_tok, tgt_tok = real_tokenizer("gpt-2"), real_tokenizer("llama-spm")
    turns = [("user", "What is 12 × 7?"), ("assistant", "12 × 7 = 84. Multiply 12 by 7 — that's 84 ✅.")]
    src_text = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)
    tgt_text = "".join(f"[INST] {c} [/INST]" if r == "user" else f" {c}</s>" for r, c in turns)
    content = turns[1][1]
    lo = tgt_text.encode().index(content.encode())
    hi = lo + len(content.encode())
    t = Transferer(vocab_info(src_tok), vocab_info(tgt_tok))
    src, tgt = encode_offsets(src_tok, src_text), encode_offsets(tgt_tok, tgt_text)
    spans = remap_spans(src_text.encode(), tgt_text.encode(), t.source_spans(src_text, src))
    ids, logp = perfect_source_topk(src.ids, 8, len(t.source))
    (out,) = t.run([(tgt_text, TextTokens(src.ids, src.starts, spans), tgt, ids, logp)], out_k=8)
    tgt_spans = t.spans(tgt_text, tgt, t.target.bytes)
    rows = [j for j in range(len(tgt.ids) - 1) if lo <= tgt_spans[j + 1][0] and tgt_spans[j + 1][1] <= hi and tgt_spans[j + 1][1] > tgt_spans[j + 1][0]]
    assert len(rows) > 10
    r = recalled(out, tgt.ids)
    assert r[rows].all()
    # Template markup is never aligned: the rows predicting "[/INST]" pieces carry nothing.
    inst = tgt_text.encode().index(b" [/INST]")
    markup = [j for j in range(len(tgt.ids) - 1) if inst < tgt_spans[j + 1][0] < inst + 8]
    assert markup and not out.carried[markup].any()


def test_end_of_document_maps_by_role():
    src_tok, tgt_tok = real_tokenizer("gpt-2"), real_tokenizer("llama-spm")
    text = "The end of a document."
    t = Transferer(vocab_info(src_tok), vocab_info(tgt_tok))
    src, tgt = encode_offsets(src_tok, text), encode_offsets(tgt_tok, text)
    src = TextTokens(np.r_[src.ids, src_tok.eos_token_id], np.r_[src.starts, len(text)])
    tgt = TextTokens(np.r_[tgt.ids, tgt_tok.eos_token_id], np.r_[tgt.starts, len(text)])
    ids, logp = perfect_source_topk(src.ids, 8, len(t.source))
    (out,) = t.run([(text, src, tgt, ids, logp)], out_k=8)
    assert recalled(out, tgt.ids)[-1]  # the last text token's row predicts EOS
    assert out.ids[-2, 0] == tgt_tok.eos_token_id


@pytest.mark.parametrize("method", ["bytespan", "fusellm", "fusechat"])
def test_bad_arrays_are_clear_errors(method):
    tok = real_tokenizer("gpt-2")
    text = "some text here"
    ids, logp = perfect_source_topk(encode_offsets(tok, text).ids, 4, len(tok))
    cases = [
        ((np.zeros((1, 3), np.int64), np.zeros((1, 3), np.float32)), ValueError, "n_s"),
        ((ids[:, :0], logp[:, :0]), ValueError, "k ≥ 1"),
        ((ids.astype(float), logp), TypeError, "integer"),
        ((ids, logp + 3), ValueError, "log-probabilities"),
        ((ids, np.where(ids == ids[0, 0], np.nan, logp)), ValueError, "NaN"),
        ((ids - len(tok) - 5, logp), ValueError, "-1"),
    ]
    for args, kind, words in cases:
        with pytest.raises(kind, match=words):
            fusekit.transfer(text, tok, tok, *args, method=method)
    with pytest.raises(ValueError, match="choose from"):
        fusekit.transfer(text, tok, tok, ids, logp, method="BYTESPAN")
    out = fusekit.transfer(text, tok, tok, ids, logp, method=method)
    assert not out.carried[-1] and (out.ids[-1] == -1).all()  # the last row predicts nothing, in every method


def test_a_normalising_tokenizer_onto_itself_never_borrows_a_neighbours_row():
    """MPT normalises to NFC: a decomposed character has no bytes of its own in its tokens. The rows
    around it fall back instead of taking another row's distribution."""
    tok = real_tokenizer("mpt")
    text = "I ❤️ 🍕 e\u0301 你好\r\n\tx  12345"
    src = encode_offsets(tok, text)
    ids, logp = perfect_source_topk(src.ids, 5, len(tok))
    out = fusekit.transfer(text, tok, tok, ids, logp)
    rows = np.flatnonzero(out.carried)
    assert rows.size >= len(src.ids) - 3
    assert (out.source_row[rows] == rows).all()


@pytest.fixture(scope="module")
def tiny_llama2(tmp_path_factory):
    """A tiny random model on the real Llama-2 vocabulary (SentencePiece with byte fallback)."""
    from transformers import AutoModelForCausalLM

    from fusekit import zoo

    tok = real_tokenizer("llama-spm")
    folder = zoo.build_tiny_model("llama", tok, tmp_path_factory.mktemp("llama2") / "m", seed=1, hidden=16, layers=1)
    return tok, AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("window", [7, 64, 2048])
def test_a_model_aligned_onto_itself_through_stores_at_any_window_length(window, tmp_path, tiny_llama2):
    """The store path: one extraction of a tiny model on the real Llama-2 vocabulary (byte fallback),
    aligned onto itself, gives every position's own distribution back (twins and specials merged as in
    the text-level test), across every window boundary."""
    from align_store_data import memory_store

    from fusekit.store.aligned_store import AlignedStore

    tok, model = tiny_llama2
    texts = [HARD_TEXT, "Plain words, then digits 0123456789 and more words.\n" * 3]
    store = memory_store(model, tok, texts, k=5, max_length=window, name="self")
    fusekit.run_align(store, [store], tmp_path / "aligned", progress=False).report
    info = store.vocab_info
    rows = 0
    for w in AlignedStore(tmp_path / "aligned").iter_windows():
        own, back = w.candidates
        for j in range(len(w.input_ids) - 1):
            logp = np.log(np.maximum(own.probs[j], 1e-30))
            want = _merged_expectation(info, own.ids[j], logp)
            got = {int(t): float(p) for t, p in zip(back.ids[j], back.probs[j]) if t >= 0}
            assert got.keys() == want.keys(), (w.text_id, w.window, j)
            for t in want:
                assert got[t] == pytest.approx(want[t], abs=2e-3)  # fp16 probabilities in the store
            rows += 1
    assert rows > 60


CHAT = [("user", "What is 12 × 7?"), ("assistant", "12 × 7 = 84."), ("user", "And 84 ÷ 7?"), ("assistant", "It is 12, of course.")]


def chatml(turns) -> str:
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)


def llama3_chat(turns) -> str:
    return "<|begin_of_text|>" + "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in turns)


def llama2_chat(turns) -> str:
    users, answers = turns[0::2], turns[1::2]
    return "".join(f"<s>[INST] {u[1]} [/INST] {a[1]} </s>" for u, a in zip(users, answers))


@pytest.mark.parametrize("target, render", [("llama-bpe", llama3_chat), ("llama-spm", llama2_chat)])
def test_end_of_turn_maps_by_role_across_templates(target, render):
    """Qwen2's ChatML ends turns with <|im_end|>; Llama-3's template with <|eot_id|>, Llama-2's with </s>.
    A perfect source's end of turn reaches every target row that predicts its own template's end of turn,
    from the source row of the same turn (not another turn's)."""
    src_tok, tgt_tok = real_tokenizer("qwen2"), real_tokenizer(target)
    t = Transferer(vocab_info(src_tok), vocab_info(tgt_tok))
    assert t.source.eot == src_tok.convert_tokens_to_ids("<|im_end|>")
    src_text, tgt_text = chatml(CHAT), render(CHAT)
    src, tgt = encode_offsets(src_tok, src_text), encode_offsets(tgt_tok, tgt_text)
    spans = remap_spans(src_text.encode(), tgt_text.encode(), t.source_spans(src_text, src))
    ids, logp = perfect_source_topk(src.ids, 8, len(t.source))
    (out,) = t.run([(tgt_text, TextTokens(src.ids, src.starts, spans), tgt, ids, logp)], out_k=8)
    ends = {t.target.eos, t.target.eot} - {None}
    end_rows = [j for j in range(len(tgt.ids) - 1) if tgt.ids[j + 1] in ends]
    src_ends = [u for u in range(len(src.ids)) if src.ids[u] == t.source.eot]
    expected = len(CHAT) if target == "llama-bpe" else len(CHAT) // 2  # Llama-2 ends only the answers
    assert len(end_rows) == expected
    assert recalled(out, tgt.ids)[end_rows].all()
    # Each target turn end starts from the source row predicting the <|im_end|> after the same content.
    tgt_spans = t.spans(tgt_text, tgt, t.target.bytes)
    for j in end_rows:
        content_end = max(e for s, e in tgt_spans[: j + 1].tolist() if e > s and tgt_text.encode()[s:e].strip())
        u = int(out.source_row[j]) + 1
        assert u in src_ends and spans[u][0] == content_end


@pytest.mark.parametrize("method", ["fusellm", "fusechat"])
def test_paper_rule_never_carries_a_row_about_a_token_the_target_cannot_take(method):
    """Phi-3 onto itself over a chat: a row whose next source token is a role marker (mapped nowhere) falls
    back to one-hot; it never carries the top-k's leftover noise, renormalised, as a confident row."""
    tok = real_tokenizer("phi-3")
    text = "<|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    ids = encode_offsets(tok, text).ids
    topk, logp = perfect_source_topk(ids, 4, len(tok))
    out = fusekit.transfer(text, tok, tok, topk, logp, method=method)
    info = vocab_info(tok)
    for j in range(len(ids) - 1):
        nxt = ids[j + 1]
        if info.kind[nxt] == SPECIAL and nxt not in (info.eos, info.eot):
            assert not out.carried[j] and out.ids[j, 0] == nxt and out.probs[j, 0] == 1.0, j
        elif out.carried[j]:
            assert out.probs[j][out.ids[j] == nxt].sum() > 0.99, j  # what carries is the source's own row


def test_the_paper_rule_records_each_carried_rows_mass_before_renormalising():
    """`fusellm` on GPT-2 onto itself (every position 1:1): a carried row's mass is its source row's top-k
    mass, and with out_k < k what the first out_k entries of it keep; NaN where nothing carried."""
    tok = real_tokenizer("gpt-2")
    src = encode_offsets(tok, HARD_TEXT)
    ids, logp = _random_topk(len(src.ids), 6, len(tok), seed=3)
    ids[:-1, 0] = src.ids[1:]
    whole = fusekit.transfer(HARD_TEXT, tok, tok, ids, logp, method="fusellm")
    cut = fusekit.transfer(HARD_TEXT, tok, tok, ids, logp, method="fusellm", out_k=2)
    rows = np.flatnonzero(whole.carried)
    assert len(rows) > 20 and np.isnan(whole.mass[~whole.carried]).all()
    p = np.exp(logp.astype(np.float64))
    np.testing.assert_allclose(whole.mass[rows], p[rows].sum(1), rtol=1e-5)  # < 1: the top-k leaves e^−0.05 out
    top2 = np.sort(p[rows], axis=1)[:, -2:].sum(1)
    np.testing.assert_allclose(cut.mass[rows], top2, rtol=1e-5)
