"""On-policy sampling of `fusekit distill`: one batched `generate` call whose rows are each row's own
continuation, exact samples of softmax(logits/T), and chat data rendered through every model's own
chat template (refused, before any step, where a model has none)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fusekit.train.examples import TrainDataError
from fusekit.train.on_policy import sample, sample_batch
from fusekit.train.online import distill

OPTS = dict(batch_size=1, shuffle=False, lr=1e-3, lam=0.5, progress=False)


@pytest.fixture(scope="module")
def target_lm(online_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(online_models["target"]).eval()


def reference_sample(lm, prompt, length: int, seed: int, stop=(), temperature: float = 1.0) -> np.ndarray:
    """The documented sampling rule, one sequence at a time, without `generate`, KV cache or padding: at each
    step the whole sequence runs through the model, and the token is argmax(logits/T + g) with g the
    Gumbel noise −log(−log u), u ~ U[0, 1)^V (float64) from a CPU generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    ids = [int(t) for t in prompt]
    with torch.no_grad():
        while len(ids) < length:
            logits = lm(torch.tensor([ids])).logits[0, -1].double()
            u = torch.rand(logits.shape[-1], generator=gen, dtype=torch.float64)
            token = int(torch.argmax(logits / temperature - torch.log(-torch.log(u))))
            if token in stop:
                break
            ids.append(token)
    return np.asarray(ids, dtype=np.int64)


def test_one_batched_call_gives_each_rows_own_continuation(target_lm, monkeypatch):
    """Prompts of different lengths (left-padded in the batch) and different budgets: every row equals the
    sequence-at-a-time reference with its seed; `generate` is called once for the whole batch."""
    calls = []
    generate = type(target_lm).generate
    monkeypatch.setattr(type(target_lm), "generate", lambda self, *a, **k: (calls.append(k["input_ids"].shape), generate(self, *a, **k))[1])
    prompts = [np.array([5, 17, 42, 9]), np.array([7, 3]), np.array([11, 250, 300, 12, 40, 41, 99])]
    lengths, seeds = [20, 30, 12], [101, 202, 303]
    got = sample_batch(target_lm, prompts, lengths, seeds)
    assert calls == [(3, 7)]  # one call, the batch left-padded to the longest prompt
    for prompt, n, seed, row in zip(prompts, lengths, seeds, got.sequences):
        np.testing.assert_array_equal(row, reference_sample(target_lm, prompt, n, seed))
    assert got.stopped == [False, False, False]


def test_generation_stops_at_a_stop_token_and_drops_it(target_lm):
    prompt = np.array([5, 17, 42, 9])
    free = reference_sample(target_lm, prompt, 24, seed=7)
    stop = int(free[10])  # the 7th sampled token, taken as the stop id
    first = int(np.flatnonzero(free[4:] == stop)[0]) + 4
    got = sample_batch(target_lm, [prompt, np.array([8, 8])], [24, 24], [7, 8], stop=[stop])
    np.testing.assert_array_equal(got.sequences[0], free[:first])
    assert got.stopped[0]
    np.testing.assert_array_equal(got.sequences[1], reference_sample(target_lm, [8, 8], 24, 8, stop=(stop,)))


def test_same_seed_same_tokens_and_batch_neighbours_do_not_matter(target_lm):
    a = sample_batch(target_lm, [np.array([5, 17]), np.array([9, 9, 9])], [16, 16], [1, 2]).sequences
    b = sample_batch(target_lm, [np.array([5, 17]), np.array([9, 9, 9])], [16, 16], [1, 2]).sequences
    c = sample_batch(target_lm, [np.array([5, 17]), np.array([30, 31])], [16, 10], [1, 5]).sequences
    np.testing.assert_array_equal(a[0], b[0]) and np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], c[0])  # row 0's tokens whatever the other row is
    np.testing.assert_array_equal(a[0], sample(target_lm, np.array([5, 17]), 16, seed=1, eos=None))
    assert not np.array_equal(a[0], sample(target_lm, np.array([5, 17]), 16, seed=3, eos=None))


def test_draws_follow_softmax_over_temperature(target_lm):
    """Gumbel-max draws are exact samples: over 4000 seeds, each of the most likely first tokens is drawn
    with its softmax(logits/T) probability, to 4.5 binomial standard deviations (T = 0.05 sharpens the tiny
    model's near-uniform distribution so that the four checked tokens carry a third of the mass)."""
    prompt, temperature, n = np.array([5, 17, 42, 9]), 0.05, 4000
    with torch.no_grad():
        p = torch.softmax(target_lm(torch.as_tensor(prompt)[None]).logits[0, -1].double() / temperature, -1).numpy()
    got = sample_batch(target_lm, [prompt] * n, [5] * n, list(range(n)), temperature=temperature).sequences
    counts = np.bincount([int(s[-1]) for s in got], minlength=len(p))
    top = np.argsort(p)[::-1][:4]
    assert p[top].sum() > 0.3
    for t in top:
        sd = np.sqrt(p[t] * (1 - p[t]) / n)
        assert abs(counts[t] / n - p[t]) < 4.5 * sd, (t, counts[t] / n, p[t])


# --- chat data -------------------------------------------------------------------------------------

# A template per model, each with its own markers, so a text shows whose template rendered it.
MARKS = {"target": ("[[", "]] ", " ;;\n"), "t1": ("### ", ": ", "\n"), "t2": ("<< ", " >> ", " ..\n")}


def template(pre: str, mid: str, end: str) -> str:
    return ("{% for m in messages %}" + pre + "{{ m['role'] }}" + mid + "{{ m['content'] }}" + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + pre + "assistant" + mid + "{% endif %}")


def with_template(model, dest, marks):
    shutil.copytree(model, dest)
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template(*marks)
    path.write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def chats(online_models, corpus_texts, tmp_path_factory):
    """The tiny models with a chat template each, the same without, and a corpus of three conversations."""
    root = tmp_path_factory.mktemp("chat")
    m = online_models
    plain = {"target": m["target"], "t1": m["teachers"][0], "t2": m["teachers"][1]}
    templated = {name: with_template(path, root / name, MARKS[name]) for name, path in plain.items()}
    corpus = root / "chat.jsonl"
    rows = []
    for text in corpus_texts[10:13]:
        text = " ".join(text.split())
        rows.append({"messages": [{"role": "user", "content": text[:60]}, {"role": "assistant", "content": text[60:140]}]})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"plain": plain, "templated": templated, "corpus": corpus, "rows": rows}


@pytest.mark.parametrize("missing", ["target", "t2"])
def test_on_policy_chat_refuses_a_model_without_template_before_any_step(chats, tmp_path, missing):
    models = {**chats["templated"], missing: chats["plain"][missing]}
    with pytest.raises(TrainDataError) as err:
        distill(models["target"], [models["t1"], models["t2"]], chats["corpus"], tmp_path / "x", top_k=4, max_length=64,
                max_steps=1, on_policy_ratio=0.5, **OPTS)
    message = str(err.value)
    role = "the target" if missing == "target" else "teacher 2"
    assert f"{models[missing]} ({role}) has no chat template" in message and "--on-policy-ratio 0" in message
    assert "chat_template" in message  # the way out: give it one
    assert ("leave this teacher out" in message) == (missing != "target")  # the target cannot be left out
    assert not (tmp_path / "x").exists()  # stopped before the output folder was made


def test_cli_names_the_model_without_template_on_one_error_line(chats, tmp_path):
    from typer.testing import CliRunner

    from fusekit.cli import app

    t = chats["templated"]
    result = CliRunner().invoke(app, ["distill", "-m", str(t["target"]), "-t", str(t["t1"]), "-t", str(chats["plain"]["t2"]),
                                      "-d", str(chats["corpus"]), "-o", str(tmp_path / "x"), "--top-k", "4",
                                      "--on-policy-ratio", "1", "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(chats["plain"]["t2"]) in errors[0] and "no chat template" in errors[0]


def test_sampled_answer_is_rendered_through_each_models_own_template(chats, tmp_path):
    """ratio 1, one conversation per micro-batch: the target answers the user turn (its own template's
    generation prompt), and each model then runs over the conversation with the sampled answer rendered by
    its *own* template — the same answer in all three, not the corpus's; the target's loss mask is on it."""
    t = chats["templated"]
    calls: list[tuple[int, list]] = []

    def hook(model, windows):
        calls.append((model, windows))
        return windows

    distill(t["target"], [t["t1"], t["t2"]], chats["corpus"], tmp_path / "run", top_k=4, max_length=64, max_steps=1,
            on_policy_ratio=1.0, windows_hook=hook, **OPTS)
    sampled = calls[-3:]  # the last alignment: the samples of the only micro-batch (target, t1, t2)
    assert [m for m, _ in sampled] == [0, 1, 2]
    user = chats["rows"][0]["messages"][0]["content"]  # shuffle off: the first conversation
    answers = []
    for (model, windows), name in zip(sampled, ("target", "t1", "t2")):
        pre, mid, end = MARKS[name]
        text = "".join(w.text for w in sorted(windows, key=lambda w: w.window))
        head = f"{pre}user{mid}{user}{end}{pre}assistant{mid}"
        assert text.startswith(head) and text.endswith(end), (name, text)
        answers.append(text[len(head) : len(text) - len(end)])
    assert answers[0] and answers[0] == answers[1] == answers[2] and answers[0] != chats["rows"][0]["messages"][1]["content"]
    target_windows = sorted(sampled[0][1], key=lambda w: w.window)
    assert all(w.loss_mask is not None for w in target_windows)
    assert not target_windows[0].loss_mask[0] and any(w.loss_mask.any() for w in target_windows)  # the user turn is not trained on
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["fusion"] > 0
