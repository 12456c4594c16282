"""Implicit fusion (FuseChat-3.0): verifiers, pair rules, DPO loss, sampling, the whole run on a task."""

from __future__ import annotations

import importlib.util
import json
import math
from io import BytesIO
from pathlib import Path

import polars as pl
import pytest
import yaml

from fusekit.implicit.build import build_sets
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.prompts import Prompt, read_prompts
from fusekit.implicit.reward import ScoreReport, exact_match, load_function, numeric, score_with_function


# ---------------------------------------------------------------------------------------------- verifiers


def test_numeric_verifier_reads_the_last_number():
    assert numeric([], "3 + 4 = 7", 7) == 1.0
    assert numeric([], "first 7, then 8", 7) == 0.0  # the last number counts
    assert numeric([], "It is 1,234.0.", "1234") == 1.0  # thousands separators, trailing period
    assert numeric([], "-2.5", -2.5) == 1.0
    assert numeric([], "no number here", 3) == 0.0
    assert numeric([], "The answer is 0.1", "answer: 0.10") == 1.0
    with pytest.raises(ValueError):
        numeric([], "7", None)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match([], "  c\n", "c") == 1.0
    assert exact_match([], "C", "c") == 0.0
    assert exact_match([], "c c", "c") == 0.0


def test_failing_reward_function_is_named_counted_and_skipped():
    def flaky(messages, response, reference):
        if response == "boom":
            raise RuntimeError("cannot parse")
        return math.nan if response == "nan" else 1.0

    rows = [(f"row {i}", [], r, None) for i, r in enumerate(["ok", "boom", "nan", "ok"])]
    report = ScoreReport()
    out = score_with_function(flaky, rows, report, name="reward function 'm:flaky'")
    assert out == [1.0, None, None, 1.0]
    assert (report.scored, report.failed) == (2, 2)
    assert "row 1" in report.examples[0] and "RuntimeError" in report.examples[0] and "m:flaky" in report.examples[0]
    assert "nan" in report.examples[1]


def test_reward_function_from_the_config_folder(tmp_path):
    (tmp_path / "myreward.py").write_text("def score(messages, response, reference):\n    return float(len(response))\n")
    fn = load_function("myreward:score", tmp_path)
    assert fn([], "abc", None) == 3.0
    with pytest.raises(ImplicitError, match="cannot import"):
        load_function("no_such_module_19:score", tmp_path)
    with pytest.raises(ImplicitError, match="no function 'missing'"):
        load_function("myreward:missing", tmp_path)
    with pytest.raises(ImplicitError, match="built-in"):
        load_function("not-a-spec", tmp_path)


# ---------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [{"role": "system", "content": "be brief"}]}', "no user turn"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "ends with an assistant turn"),
        ('{"text": "hi"}', "no 'messages' list"),
        ("{not json", "not valid JSON"),
        ('{"messages": [{"role": "user"}]}', "string 'content'"),
    ],
)
def test_bad_prompts_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "fine"}]}\n' + line + "\n")
    with pytest.raises(ImplicitError, match=message) as err:
        read_prompts(path)
    assert f"{path}:2" in str(err.value) and "\n" not in str(err.value)


def test_prompts_ids_default_to_position_and_must_be_unique(tmp_path):
    path = tmp_path / "p.jsonl"
    user = {"role": "user", "content": "q"}
    path.write_text(json.dumps({"messages": [user], "reference": 3}) + "\n\n" + json.dumps({"messages": [user]}) + "\n")
    prompts = read_prompts(path)
    assert [(p.id, p.reference) for p in prompts] == [("0", 3), ("1", None)]
    path.write_text("".join(json.dumps({"id": "x", "messages": [user]}) + "\n" for _ in range(2)))
    with pytest.raises(ImplicitError, match="'x' appears more than once"):
        read_prompts(path)


# ---------------------------------------------------------------------------------------------- build


def _responses(rows):
    return pl.DataFrame(
        [dict(zip(("prompt_id", "source", "sample", "response", "reward"), r)) for r in rows],
        schema={"prompt_id": pl.String, "source": pl.String, "sample": pl.Int32, "response": pl.String, "reward": pl.Float64},
    )


def test_build_rules_on_a_hand_worked_example():
    frame = _responses([
        # p1: a's gap 0.9 − 0.1 = 0.8 beats b's 1.0 − 0.5 = 0.5; the SFT pick is b's 1.0 (best overall)
        ("p1", "a", 0, "a0 long answer", 0.9), ("p1", "a", 1, "a1", 0.1), ("p1", "a", 2, "a2", 0.5),
        ("p1", "b", 0, "b0", 1.0), ("p1", "b", 1, "b1", 0.5),
        # p2: tie at the top (1.0): the shorter response wins SFT; a's worst tie (0.0): the longer is rejected
        ("p2", "a", 0, "long correct", 1.0), ("p2", "a", 1, "x", 0.0), ("p2", "a", 2, "longer wrong", 0.0),
        ("p2", "b", 0, "short", 1.0), ("p2", "b", 1, "bbbbbb", 1.0),
        # p3: every source scored its samples alike → an SFT row, no pair; a null reward takes no part
        ("p3", "a", 0, "same", 0.5), ("p3", "a", 1, "same too", 0.5), ("p3", "b", 0, "failed", None), ("p3", "b", 1, "bz", 0.2),
        # p4: only failures → nothing
        ("p4", "a", 0, "?", None),
    ])
    sft, pairs = build_sets(frame, ["p1", "p2", "p3", "p4"], ["a", "b"])
    assert sft.select("prompt_id", "source", "sample").rows() == [("p1", "b", 0), ("p2", "b", 0), ("p3", "a", 0)]
    assert pairs.select("prompt_id", "source", "chosen", "rejected").rows() == [
        ("p1", "a", "a0 long answer", "a1"),
        ("p2", "a", "long correct", "longer wrong"),
    ]
    assert pairs["gap"].to_list() == pytest.approx([0.8, 1.0])
    # With a margin of 0.9, p1's pair (gap 0.8) is dropped and p2's (gap 1.0) stays.
    _, strict = build_sets(frame, ["p1", "p2", "p3", "p4"], ["a", "b"], margin=0.9)
    assert strict["prompt_id"].to_list() == ["p2"]


def test_equal_gaps_go_to_the_earlier_source():
    frame = _responses([("p", "b", 0, "b-hi", 1.0), ("p", "b", 1, "b-lo", 0.0), ("p", "a", 0, "a-hi", 1.0), ("p", "a", 1, "a-lo", 0.0)])
    sft, pairs = build_sets(frame, ["p"], ["a", "b"])
    assert pairs["source"].to_list() == ["a"] and sft["source"].to_list() == ["a"]
    _, pairs = build_sets(frame, ["p"], ["b", "a"])
    assert pairs["source"].to_list() == ["b"]


# ---------------------------------------------------------------------------------------------- models

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizers_by_kind):
    """Two tiny random Llama models sharing a real BPE tokenizer (no chat template: the plain format)."""
    from fusekit import zoo

    root = tmp_path_factory.mktemp("implicit-models")
    tok = tokenizers_by_kind["bpe"]
    return {
        "policy": zoo.build_tiny_model("llama", tok, root / "policy", seed=1, hidden=32, layers=1, heads=2, context=128),
        "reference": zoo.build_tiny_model("llama", tok, root / "reference", seed=2, hidden=32, layers=1, heads=2, context=128),
    }


TRIPLES = [
    ([{"role": "user", "content": "What is the capital of Italy?"}], "Rome.", "It is Paris, the city of light."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}], "4", "five"),
    ([{"role": "user", "content": "Name a prime"}], "Seven is a prime number.", "Nine"),
]


def _slow_logp(net, tok, messages, response) -> torch.Tensor:
    """log π(response | prompt), one example, no padding: Σ_t log softmax(logits at t−1)[token t] (float64)."""
    prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    logits = net(input_ids=ids).logits[0].double()
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(prompt), len(prompt) + len(answer)):
        total = total + torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]]
    return total


def test_dpo_loss_and_gradient_match_the_paper_formula_per_example(tiny):
    """Batched, padded DPO (one forward for chosen+rejected) vs eq. 7 of the DPO paper computed per pair
    from separate unpadded forward passes: same loss, same gradient."""
    from fusekit.implicit.dpo import dpo_loss
    from fusekit.implicit.sequences import collate, encode, sequence_logps
    from fusekit.models.load import load_model, load_tokenizer

    tok = load_tokenizer(tiny["policy"])
    policy, reference = load_model(tiny["policy"]), load_model(tiny["reference"])
    beta = 0.3
    with torch.no_grad():
        ref = [(_slow_logp(reference, tok, m, c), _slow_logp(reference, tok, m, r)) for m, c, r in TRIPLES]
    slow_terms = []
    for (m, c, r), (rc, rr) in zip(TRIPLES, ref):
        z = beta * ((_slow_logp(policy, tok, m, c) - rc) - (_slow_logp(policy, tok, m, r) - rr))
        slow_terms.append(torch.log1p(torch.exp(-z)))  # −log σ(z)
    slow = torch.stack(slow_terms).mean()
    slow.backward()
    slow_grad = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    items = [encode(tok, m, c, 512) for m, c, _ in TRIPLES] + [encode(tok, m, r, 512) for m, _, r in TRIPLES]
    batch = collate(items, tok.pad_token_id)
    assert (batch.attention_mask == 0).any()  # the batch really is padded
    logps = sequence_logps(policy, batch)
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch)
    n = len(TRIPLES)
    out = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(slow.detach()), rel=1e-5)
    assert ref_logps[:n].tolist() == pytest.approx([float(a) for a, _ in ref], rel=1e-5)
    for name, p in policy.named_parameters():
        assert torch.allclose(p.grad, slow_grad[name].float(), rtol=1e-3, atol=1e-6), name


def test_dpo_loss_is_log2_when_policy_equals_reference_and_rejects_bad_shapes():
    from fusekit.implicit.dpo import dpo_loss

    lp = torch.tensor([-3.0, -10.0])
    out = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert float(out.loss) == pytest.approx(math.log(2))
    # A policy that moved 2 nats towards the chosen answer: −log σ(β·2).
    out = dpo_loss(lp + 1, lp - 1, lp, lp, beta=0.5)
    assert float(out.loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    with pytest.raises(ValueError, match="share one shape"):
        dpo_loss(lp, lp[:1], lp, lp, beta=0.1)


def test_sampling_is_deterministic_resumable_and_batching_does_not_change_greedy_answers(tiny, tmp_path):
    from fusekit.implicit.config import SampleOptions
    from fusekit.implicit.sample import load_generator, sample_model

    prompts = [Prompt(str(i), [{"role": "user", "content": text}]) for i, text in enumerate(
        ["hello", "a much longer question about the modules of the standard library", "why", "tell me about classes and functions", "x"]
    )]
    opts = SampleOptions(n=3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5, batch_size=2, device="cpu")
    model = load_generator(tiny["policy"], "cpu")
    first, stats = sample_model(tiny["policy"], "p", prompts, opts, tmp_path / "one", model=model)
    assert first.height == len(prompts) * 3 and stats["tokens"] == int(first["n_tokens"].sum())
    assert set(first["finish_reason"]) <= {"stop", "length"}
    assert (first["n_tokens"] <= 6).all()
    assert (first.filter(pl.col("finish_reason") == "length")["n_tokens"] == 6).all()
    assert first["response"].n_unique() > 3  # sampling, not one answer repeated
    for row in first.iter_rows(named=True):
        assert model.tokenizer.decode(row["tokens"], skip_special_tokens=True) == row["response"]
    again, _ = sample_model(tiny["policy"], "p", prompts, opts, tmp_path / "two", model=model)
    assert again.equals(first)
    # A killed run: the last chunk never written. Resuming writes exactly the missing part.
    (tmp_path / "one" / "chunk-00002.parquet").unlink()
    resumed, stats = sample_model(tiny["policy"], "p", prompts, opts, tmp_path / "one", model=model)
    assert resumed.equals(first) and stats["tokens"] == int(first.filter(pl.col("prompt_id") == "4")["n_tokens"].sum())

    greedy = opts.model_copy(update={"temperature": 0.0, "n": 1})
    batched, _ = sample_model(tiny["policy"], "p", prompts, greedy.model_copy(update={"batch_size": 5}), tmp_path / "b", model=model)
    single, _ = sample_model(tiny["policy"], "p", prompts, greedy.model_copy(update={"batch_size": 1}), tmp_path / "s", model=model)
    assert batched["tokens"].to_list() == single["tokens"].to_list()  # left padding changes nothing
    twice, _ = sample_model(tiny["policy"], "p", prompts, greedy.model_copy(update={"n": 2}), tmp_path / "g2", model=model)
    assert twice["tokens"].to_list() == [t for t in single["tokens"].to_list() for _ in range(2)]  # greedy: n alike


def test_reward_model_uses_its_own_tokenizer_and_padding_changes_nothing(tmp_path, tokenizers_by_kind):
    from transformers import AutoModelForSequenceClassification

    from fusekit import zoo
    from fusekit.implicit.config import RewardOptions
    from fusekit.implicit.score import Scorer

    tok = tokenizers_by_kind["unigram"]  # not the policy's tokenizer
    config = zoo.tiny_config("llama", len(tok), hidden=32, layers=1, heads=2, context=128)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = {"a": Prompt("a", [{"role": "user", "content": "say hello"}]), "b": Prompt("b", [{"role": "user", "content": "count to three please"}])}
    frame = pl.DataFrame({"prompt_id": ["a", "b", "a"], "source": ["s"] * 3, "sample": [0, 0, 1], "response": ["hello", "one two three", "hello there, friend"]})
    scored, report = Scorer(RewardOptions(model=str(tmp_path / "rm"), batch_size=3), device="cpu").score(frame, prompts)
    assert report.failed == 0
    net = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for row in scored.iter_rows(named=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompts[row["prompt_id"]].messages) + f"assistant: {row['response']}\n"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            alone = float(net(input_ids=ids).logits[0, 0])
        assert row["reward"] == pytest.approx(alone, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------- the whole run


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from fusekit.implicit.synthetic import build_task

    root = tmp_path_factory.mktemp("implicit-task")
    return root, build_task(root, seed=0)


def _write_config(root: Path, paths: dict, **overrides) -> Path:
    from fusekit.implicit.synthetic import task_config

    config = task_config(root, paths, **overrides)
    path = root / "implicit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_implicit_fusion_end_to_end_the_target_learns_from_the_good_source(task):
    from typer.testing import CliRunner

    from fusekit.cli import app

    root, paths = task
    config = _write_config(root, paths)
    track = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    result = CliRunner().invoke(app, ["implicit", str(config), "--no-progress", *track])
    assert result.exit_code == 0, result.output
    assert "held-out mean reward" in result.output and "fused model:" in result.output
    work = root / "run"
    for stage in ("sft", "dpo"):  # each stage's model carries a card; its steps reached TensorBoard
        card = (work / stage / "model" / "README.md").read_text()
        assert card.startswith("---\n") and "implicit-fusion" in card and "- `good`" in card and "- `bad`" in card
        assert not track or any((work / stage / "tensorboard").glob("events.out.tfevents.*"))
    responses = pl.read_parquet(work / "responses.parquet")
    prompts = read_prompts(paths["prompts"])
    assert responses.height == len(prompts) * 2 * 4 and responses["reward"].null_count() == 0
    # Rewards are the verifier's, recomputed here.
    refs = {p.id: p.reference for p in prompts}
    assert responses["reward"].to_list() == [float(r.strip() == refs[p]) for p, r in zip(responses["prompt_id"], responses["response"])]

    sft = pl.read_parquet(work / "sft.parquet")
    best = responses.group_by("prompt_id").agg(pl.col("reward").max().alias("best"))
    joined = sft.join(best, on="prompt_id")
    assert (joined["reward"] == joined["best"]).all()
    pairs = pl.read_parquet(work / "pairs.parquet")
    assert pairs.height > 0 and (pairs["chosen_reward"] > pairs["rejected_reward"]).all()
    for row in pairs.iter_rows(named=True):  # chosen and rejected: two samples of one source
        own = responses.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("source") == row["source"]))
        assert {row["chosen_sample"], row["rejected_sample"]} <= set(own["sample"])
        assert own.filter(pl.col("sample") == row["rejected_sample"])["response"].item() == row["rejected"]
    assert (work / "dpo" / "reference.parquet").is_file() and (work / "dpo" / "model" / "config.json").is_file()
    per_source = json.loads((work / "stages" / "sample" / "stage.json").read_text())["per_source"]
    assert {k: v["chat_format"] for k, v in per_source.items()} == {"good": "plain", "bad": "plain"}

    results = json.loads((work / "results.json").read_text())
    reward = {r["model"]: r["mean_reward"] for r in results["eval"]}
    assert reward["good"] > reward["bad"]
    assert reward["target+sft+dpo"] > reward["target"] + 0.1  # held-out prompts: the target learned the task
    assert reward["target+sft"] > reward["target"] + 0.1
    assert (work / "results.png").is_file()

    # A run killed during DPO resumes: the stored reference log-probs are reused, the result is the same.
    record = json.loads((work / "stages" / "dpo" / "stage.json").read_text())
    (work / "stages" / "dpo" / "stage.json").write_text(json.dumps({"identity": record["identity"], "done": False}))
    reference_mtime = (work / "dpo" / "reference.parquet").stat().st_mtime_ns
    before = (work / "responses.parquet").read_bytes()
    result = CliRunner().invoke(app, ["implicit", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (work / "dpo" / "reference.parquet").stat().st_mtime_ns == reference_mtime
    assert (work / "responses.parquet").read_bytes() == before
    again = json.loads((work / "results.json").read_text())
    assert again["eval"] == results["eval"] and again["dpo"]["final_loss"] == pytest.approx(results["dpo"]["final_loss"])

    # Other DPO options: only DPO (and eval) run again; the SFT model and the samples stay.
    sft_mtime = (work / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    changed = _write_config(root, paths, dpo={"beta": 0.5})
    result = CliRunner().invoke(app, ["implicit", str(changed), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (work / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    assert (work / "responses.parquet").read_bytes() == before
    assert json.loads((work / "stages" / "dpo" / "stage.json").read_text())["identity"]["dpo"]["beta"] == 0.5
    assert (work / "dpo" / "reference.parquet").stat().st_mtime_ns != reference_mtime  # recomputed for the new stage

    # Other sampling options into the same workdir are refused, not mixed (samples are the costly part).
    other = _write_config(root, paths, sample={"n": 2})
    result = CliRunner().invoke(app, ["implicit", str(other), "--no-progress"])
    assert result.exit_code == 1 and "other inputs or options (sample)" in result.output

    # One more source: only it is sampled; the others' samples stay as they were.
    good_part = work / "stages" / "sample" / "parts" / "good" / "chunk-00000.parquet"
    good_mtime = good_part.stat().st_mtime_ns
    sources = [{"name": "good", "model": str(paths["good"])}, {"name": "bad", "model": str(paths["bad"])}, {"name": "good2", "model": str(paths["good"])}]
    more = _write_config(root, paths, sources=sources)
    result = CliRunner().invoke(app, ["implicit", str(more), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert good_part.stat().st_mtime_ns == good_mtime
    grown = pl.read_parquet(work / "responses.parquet")
    assert grown.filter(pl.col("source") != "good2").drop("reward").equals(pl.read_parquet(BytesIO(before)).drop("reward"))
    assert grown.filter(pl.col("source") == "good2").height == len(prompts) * 4


def test_cli_bad_config_and_prompts_give_one_line_errors(task, tmp_path):
    from typer.testing import CliRunner

    from fusekit.cli import app

    root, paths = task
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"messages": [{"role": "system", "content": "hi"}]}\n')
    config = _write_config(tmp_path, {**paths, "prompts": bad_prompts})
    result = CliRunner().invoke(app, ["implicit", str(config), "--no-progress"])
    assert result.exit_code == 1 and "has no user turn" in result.output and "Traceback" not in result.output

    config = _write_config(tmp_path, {**paths, "bad": tmp_path / "missing-model"})
    result = CliRunner().invoke(app, ["implicit", str(config)])
    assert result.exit_code == 1 and "model 'bad'" in result.output and "no model at" in result.output and "missing-model" in result.output

    config = _write_config(tmp_path, paths, reward={"function": "exact_match", "model": "x"})
    result = CliRunner().invoke(app, ["implicit", str(config)])
    assert result.exit_code == 1 and "exactly one of reward.function and reward.model" in result.output


def test_run_counts_and_skips_a_failing_reward_function(task, tmp_path):
    from fusekit.implicit import implicit_fusion

    root, paths = task
    (tmp_path / "flaky_reward.py").write_text(
        "import math\n"
        "def score(messages, response, reference):\n"
        "    if len(response.strip()) != 1:\n"
        "        raise ValueError('not one letter')\n"
        "    return math.nan if response.strip() == 'z' else float(response.strip() == reference)\n"
    )
    config = _write_config(tmp_path, paths, reward={"function": "flaky_reward:score"}, sft={"epochs": 1}, dpo={"epochs": 1}, eval=None)
    config.write_text(config.read_text().replace("eval: null\n", ""))
    result = implicit_fusion(config, progress=False)
    responses = pl.read_parquet(tmp_path / "run" / "responses.parquet")
    expected_failures = sum(len(r.strip()) != 1 or r.strip() == "z" for r in responses["response"])
    assert expected_failures > 0
    assert result["score"]["failed"] == expected_failures == responses["reward"].null_count()
    assert result["score"]["scored"] == responses.height - expected_failures
    assert "flaky_reward:score" in result["score"]["examples"][0]
    sft = pl.read_parquet(tmp_path / "run" / "sft.parquet")
    assert sft["reward"].null_count() == 0 and result["eval"] == []


def test_wrpo_loss_reduces_to_dpo_at_both_ends_of_alpha():
    from fusekit.implicit.dpo import dpo_loss, wrpo_loss

    g = torch.Generator().manual_seed(0)
    ws, wt, l, rws, rwt, rl = (torch.randn(5, generator=g) * 3 for _ in range(6))
    assert float(wrpo_loss(ws, wt, l, rws, rwt, rl, beta=0.2, alpha=1.0).loss) == pytest.approx(float(dpo_loss(ws, l, rws, rl, 0.2).loss))
    assert float(wrpo_loss(ws, wt, l, rws, rwt, rl, beta=0.2, alpha=0.0).loss) == pytest.approx(float(dpo_loss(wt, l, rwt, rl, 0.2).loss))
    # One pair by hand: Δws = 2, Δwt = −1, Δl = 0.5, α = 0.25, β = 1 → z = 0.5 − 0.75 − 0.5 = −0.75.
    one = wrpo_loss(*(torch.tensor([v]) for v in (2.0, -1.0, 0.5, 0.0, 0.0, 0.0)), beta=1.0, alpha=0.25)
    assert float(one.loss) == pytest.approx(math.log1p(math.exp(0.75)))
    with pytest.raises(ValueError, match="alpha"):
        wrpo_loss(ws, wt, l, rws, rwt, rl, beta=0.2, alpha=1.5)


def test_wrpo_objective_samples_the_sft_model_and_ramps_alpha(task, tmp_path):
    from fusekit.implicit import implicit_fusion

    root, paths = task
    config = _write_config(tmp_path, paths, sft={"epochs": 3}, dpo={"objective": "wrpo", "alpha": 0.8, "epochs": 2}, eval=None)
    config.write_text(config.read_text().replace("eval: null\n", ""))
    result = implicit_fusion(config, progress=False)
    work = tmp_path / "run"
    sft = dict(pl.read_parquet(work / "sft.parquet").select("prompt_id", "response").iter_rows())
    own = pl.read_parquet(work / "self_responses.parquet")
    assert set(own["source"]) == {"target+sft"} and own.height == len(read_prompts(paths["prompts"])) * 4
    triples = pl.read_parquet(work / "wrpo.parquet")
    assert triples.height == result["dpo"]["pairs"] > 0
    for row in triples.iter_rows(named=True):
        mine = own.filter(pl.col("prompt_id") == row["prompt_id"])
        assert row["chosen"] == sft[row["prompt_id"]]
        assert row["self_reward"] == mine["reward"].max() and row["rejected_reward"] == mine["reward"].min()
        assert row["chosen_reward"] > row["rejected_reward"]
    ref = pl.read_parquet(work / "dpo" / "reference.parquet")
    assert set(ref.columns) == {"row", "ref_chosen", "ref_chosen_self", "ref_rejected"}
    alphas = [json.loads(line)["alpha"] for line in (work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert alphas[0] == 0.0 and alphas[-1] == pytest.approx(0.8) and alphas == sorted(alphas)


def test_training_killed_mid_stage_continues_from_its_checkpoint_exactly(tiny, tmp_path):
    """SFT through the shared training engine: a process killed during step 7 resumes from the step-6
    checkpoint and ends with the weights and losses of an uninterrupted run."""
    from fusekit.implicit.config import SFTOptions
    from fusekit.implicit.objectives import SFTObjective
    from fusekit.implicit.sequences import encode
    from fusekit.implicit.tune import fit
    from fusekit.models.load import load_tokenizer

    tok = load_tokenizer(tiny["policy"])
    items = [encode(tok, m, c, 256) for m, c, _ in TRIPLES * 3]
    opts = SFTOptions(lr=1e-3, epochs=2, batch_size=2, save_every=2, seed=3)  # 5 steps per epoch, 10 in all
    computed: list[int] = []

    class Killable(SFTObjective):
        die_at: int | None = None

        def forward(self, model, batch, step, device):
            computed.append(step)
            if step == self.die_at:
                raise KeyboardInterrupt  # the process is killed during this step
            return super().forward(model, batch, step, device)

    def run(out: Path, die_at: int | None = None):
        computed.clear()
        objective = Killable(items, tok.pad_token_id, opts.batch_size, opts.epochs, opts.seed)
        objective.die_at = die_at
        return fit(tiny["policy"], objective, opts, out)

    whole, whole_log = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", die_at=7)
    assert (tmp_path / "killed" / "checkpoints" / "step-00000006").is_dir()
    resumed, log = run(tmp_path / "killed")
    assert computed == [6, 7, 8, 9]  # it continued from the checkpoint after step 6, not from the start
    assert [r["step"] for r in log] == list(range(1, 11))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in whole_log], rel=1e-6)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not (tmp_path / "killed" / "checkpoints").exists()  # removed once training ends


def test_sft_objective_is_the_token_mean_response_cross_entropy(tiny, tmp_path):
    """The engine's first step on SFTObjective: loss = mean over response tokens of −log p, by hand."""
    from fusekit.implicit.config import SFTOptions
    from fusekit.implicit.objectives import SFTObjective
    from fusekit.implicit.sequences import encode
    from fusekit.implicit.tune import fit
    from fusekit.models.load import load_model, load_tokenizer

    tok = load_tokenizer(tiny["policy"])
    items = [encode(tok, m, c, 256) for m, c, _ in TRIPLES]
    net = load_model(tiny["policy"])
    with torch.no_grad():  # every example in one step: Σ over examples and tokens / number of response tokens
        logps = [_slow_logp(net, tok, m, c) for m, c, _ in TRIPLES]
        n_tokens = sum(int((e.labels != -100).sum()) for e in items)
    want = -float(sum(logps)) / n_tokens
    opts = SFTOptions(lr=1e-3, epochs=1, batch_size=3, seed=0)
    _, log = fit(tiny["policy"], SFTObjective(items, tok.pad_token_id, 3, 1, 0), opts, tmp_path)
    assert len(log) == 1 and log[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_generation_stops_at_the_models_own_end_of_turn_ids(tiny):
    from fusekit.implicit.sample import generate, load_generator

    model = load_generator(tiny["policy"], "cpu")
    texts = ["user: hello\nassistant: ", "user: a longer question here\nassistant: "]
    first = generate(model, texts, n=1, max_new_tokens=5, temperature=0, top_p=1.0, seed=0)
    assert all(g[0].finish_reason == "length" and len(g[0].tokens) == 5 for g in first)
    # A chat model that ends turns with another token (as Llama-3's <|eot_id|>) lists it in its generation config.
    ender = first[0][0].tokens[2]
    model.net.generation_config.eos_token_id = [model.tokenizer.eos_token_id, ender]
    again = generate(model, texts, n=1, max_new_tokens=5, temperature=0, top_p=1.0, seed=0)
    for old, new in zip(first, again):
        cut = old[0].tokens.index(ender) if ender in old[0].tokens else None
        if cut is None:
            assert new[0].tokens == old[0].tokens and new[0].finish_reason == "length"
        else:
            assert new[0].tokens == old[0].tokens[:cut] and new[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- the fused step


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied output layer; tied to the embeddings
def test_fused_sequence_logps_equal_the_logits_path_in_value_and_gradient(arch, tiny, tokenizers_by_kind, tmp_path, monkeypatch):
    """SFT's and DPO's log π(y | x) from the output layer in chunks of 3 positions (never [B, L, V]) vs
    `sequence_logps` on the model's full logits: the same values, the same gradient of a non-linear
    (DPO-like) loss and of the SFT sum, on a padded batch with masked prompts."""
    import fusekit.train.linear_loss as linear_loss
    from fusekit import zoo
    from fusekit.implicit.sequences import collate, encode, sequence_logps
    from fusekit.models.load import load_model, load_tokenizer
    from fusekit.train.head import LogpStep

    tok = load_tokenizer(tiny["policy"])
    path = tiny["policy"] if arch == "llama" else zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], tmp_path / "g", hidden=32, context=128)
    net = load_model(path).eval()
    monkeypatch.setitem(linear_loss.CHUNK_ELEMENTS, "cpu", 3 * len(tok))
    batch = collate([encode(tok, m, c, 512) for m, c, _ in TRIPLES] + [encode(tok, m, r, 512) for m, _, r in TRIPLES], tok.pad_token_id)
    n = len(TRIPLES)

    def loss_and_grads(logps):
        loss = -torch.nn.functional.logsigmoid(0.3 * (logps[:n] - logps[n:])).sum() - 0.01 * logps.sum()
        net.zero_grad()
        loss.backward()
        return logps.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}

    want, want_grads = loss_and_grads(sequence_logps(net, batch))
    step = LogpStep(net, fused=True)
    got, got_grads = loss_and_grads(step(batch.input_ids, batch.attention_mask, batch.labels))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


DPO_WORKER = """
import pickle, sys
from pathlib import Path
from fusekit.implicit.config import DPOOptions
from fusekit.implicit.objectives import PreferenceObjective
from fusekit.implicit.tune import fit
with open(sys.argv[1], "rb") as f:
    model, encoded, refs, pad, world = pickle.load(f)
out = Path(sys.argv[2])
opts = DPOOptions(lr=1e-3, epochs=2, batch_size=3, seed=1, save_every=2)
objective = PreferenceObjective(encoded, refs, pad, objective="dpo", beta=0.3, alpha=0.5, batch_size=3, epochs=2, seed=1, world_size=world)
fit(model, objective, opts, out, save_to=out / "model")
"""


def test_dpo_on_two_processes_equals_one_process(tiny, tmp_path):
    """DPO through the fused step under torchrun (DDP, gloo): each rank takes its share of every step's
    pairs — one rank none at the last step — and the run equals one process on whole steps."""
    import pickle
    import sys

    from safetensors.torch import load_file

    from fusekit.implicit.sequences import encode
    from fusekit.models.load import load_tokenizer
    from torchrun_helpers import metrics, torchrun

    tok = load_tokenizer(tiny["policy"])
    encoded = [[encode(tok, m, c, 256) for m, c, _ in TRIPLES + TRIPLES[:1]], [encode(tok, m, r, 256) for m, _, r in TRIPLES + TRIPLES[:1]]]
    refs = [[-30.0, -21.0, -15.0, -10.0], [-25.0, -20.0, -16.0, -12.0]]
    torchrun(tmp_path, DPO_WORKER, (tiny["policy"], encoded, refs, tok.pad_token_id, 2), str(tmp_path / "ddp"))
    (tmp_path / "job1.pkl").write_bytes(pickle.dumps((tiny["policy"], encoded, refs, tok.pad_token_id, 1)))
    with pytest.MonkeyPatch.context() as mp:  # the same script in this process: one rank
        mp.setattr(sys, "argv", ["worker", str(tmp_path / "job1.pkl"), str(tmp_path / "one")])
        exec(DPO_WORKER, {})
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert len(ddp) == len(one) == 4  # 4 pairs, batches of 3: steps of 3 and 1 pairs, two epochs
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    wa, wb = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors")), load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
