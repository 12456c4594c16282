"""The sampling backend choice and the vLLM backend's plumbing.

vLLM needs a CUDA GPU and is not installed where these tests run. What is tested: the choice (`auto`,
`transformers`, `vllm`) and its one-line errors; the adapter from vLLM's output objects to fusekit's
rows, with plain dataclasses shaped like vLLM's `RequestOutput` / `CompletionOutput`; and the request
side (prompt token ids, sampling parameters, stop ids, rows written) through a stand-in `vllm` module
whose `LLM` answers deterministically. vLLM's own generation is the only part not run here
(benchmarks/bench_implicit.py --vllm runs it on a GPU).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import polars as pl
import pytest
import yaml

from fusekit.implicit import vllm_backend
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.generation import Generation
from fusekit.implicit.prompts import Prompt, render_prompt
from fusekit.implicit.sample import RESPONSE_SCHEMA, response_rows


@dataclass
class CompletionOutput:  # the fields of vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # the fields of vllm.outputs.RequestOutput that fusekit reads, and a few more
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def _decode(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


# ------------------------------------------------------------------------------------------- selection


def test_vllm_is_not_usable_here_and_auto_falls_back_to_transformers():
    assert vllm_backend.vllm_problem() is not None  # not installed on this CPU machine
    assert vllm_backend.resolve_backend("auto") == "transformers"
    assert vllm_backend.resolve_backend("transformers") == "transformers"
    with pytest.raises(ImplicitError, match=r"sample.backend vllm: vLLM is not installed .*pip install vllm"):
        vllm_backend.resolve_backend("vllm")
    with pytest.raises(ImplicitError, match="choose one of auto, transformers, vllm"):
        vllm_backend.resolve_backend("tgi")


def test_auto_takes_vllm_where_it_can_run(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_problem", lambda: None)  # as on a GPU machine with vLLM
    assert vllm_backend.resolve_backend("auto") == "vllm"
    assert vllm_backend.resolve_backend("transformers") == "transformers"


def test_sample_identity_records_only_a_non_default_backend():
    from fusekit.implicit.config import SampleOptions

    opts = SampleOptions(n=2)
    assert "backend" not in opts.identity("transformers")  # earlier workdirs keep their identity
    assert opts.identity("vllm") == {**opts.identity("transformers"), "backend": "vllm"}


def test_cli_backend_vllm_without_vllm_is_one_line_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from fusekit.cli import app

    (tmp_path / "p.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "reference": "x"}\n')
    (tmp_path / "m").mkdir()
    config = {
        "workdir": str(tmp_path / "run"), "target": {"name": "t", "model": "m"}, "sources": [{"name": "s", "model": "m"}],
        "prompts": {"data": "p.jsonl"}, "reward": {"function": "exact_match"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**config, "sample": {"backend": "vllm"}}))
    result = CliRunner().invoke(app, ["implicit", str(path), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "sample.backend vllm: vLLM is not installed" in result.output and "pip install vllm" in result.output
    assert not (tmp_path / "run" / "responses.parquet").exists()
    # The flag overrides the file, with the same error.
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["implicit", str(path), "--no-progress", "--backend", "vllm"])
    assert result.exit_code == 1 and "sample.backend vllm: vLLM is not installed" in result.output
    typo = CliRunner().invoke(app, ["implicit", str(path), "--no-progress", "--backend", "vlm"])
    assert typo.exit_code != 0 and "--backend 'vlm'" in typo.output and "Traceback" not in typo.output


# --------------------------------------------------------------------------------------------- adapter


def test_vllm_outputs_become_the_transformers_backends_generations():
    eos = 2
    outputs = [
        RequestOutput("0", None, [5, 6], [
            # listed out of order: completions are placed by their index
            CompletionOutput(1, "x", [7, 8, 9], finish_reason="length"),
            CompletionOutput(0, "x", [7, eos], finish_reason="stop"),  # a vLLM that keeps the EOS in token_ids
        ]),
        RequestOutput("1", None, [5], [
            CompletionOutput(0, "x", [9], finish_reason="stop"),  # one that drops it
            CompletionOutput(1, "x", [eos], finish_reason="stop", stop_reason=eos),  # an empty answer
        ]),
    ]
    got = vllm_backend.generations_from_vllm(outputs, 2, [eos, 3], _decode)
    assert got == [
        [Generation("t7", [7], "stop"), Generation("t7 t8 t9", [7, 8, 9], "length")],
        [Generation("t9", [9], "stop"), Generation("", [], "stop")],
    ]
    # Greedy: one completion per request, repeated n times as the transformers backend does.
    greedy = [RequestOutput("0", None, [1], [CompletionOutput(0, "x", [4, 3], finish_reason="stop")])]
    assert vllm_backend.generations_from_vllm(greedy, 3, [eos, 3], _decode) == [[Generation("t4", [4], "stop")] * 3]
    # Same rows, same schema as the transformers backend's.
    frame = response_rows("src", [Prompt("a", []), Prompt("b", [])], got)
    assert frame.schema == pl.Schema(RESPONSE_SCHEMA)
    assert frame["n_tokens"].to_list() == [1, 3, 1, 0] and frame["sample"].to_list() == [0, 1, 0, 1]


def test_vllm_adapter_refuses_aborted_or_missing_completions():
    aborted = [RequestOutput("0", None, [1], [CompletionOutput(0, "x", [4], finish_reason="abort")])]
    with pytest.raises(ImplicitError, match="finish reason 'abort'"):
        vllm_backend.generations_from_vllm(aborted, 1, [2], _decode)
    short = [RequestOutput("0", None, [1], [CompletionOutput(i, "x", [4], finish_reason="stop") for i in range(2)])]
    with pytest.raises(ImplicitError, match="2 completions for a prompt, expected 3"):
        vllm_backend.generations_from_vllm(short, 3, [2], _decode)


# ----------------------------------------------------------------------------------- request side


@dataclass
class SamplingParams:  # the keyword arguments fusekit passes to vllm.SamplingParams
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True


class EchoLLM:
    """Answers each prompt with its last prompt tokens: sample j of n = last (j + 1) tokens, then the
    first stop id; at most max_tokens tokens (then finish reason "length")."""

    instances: list["EchoLLM"] = []

    def __init__(self, model: str, seed: int):
        self.model, self.seed, self.calls = model, seed, []
        EchoLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        out = []
        for r, (prompt, p) in enumerate(zip(prompts, params)):
            completions = []
            for j in range(p.n):
                ids = list(prompt["prompt_token_ids"][-(j + 1):]) + [p.stop_token_ids[0]]
                reason = "stop" if len(ids) <= p.max_tokens else "length"
                completions.append(CompletionOutput(j, "ignored", ids[: p.max_tokens], finish_reason=reason))
            out.append(RequestOutput(str(r), None, prompt["prompt_token_ids"], completions))
        return out


def test_vllm_backend_sends_the_same_prompt_tokens_and_writes_the_same_rows(tokenizers_by_kind, tmp_path, monkeypatch):
    from fusekit import zoo
    from fusekit.implicit.config import SampleOptions
    from fusekit.implicit.sample import sample_model
    from fusekit.models.load import load_tokenizer

    model = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], tmp_path / "m", hidden=16, layers=1, heads=2, context=64)
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = EchoLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_backend, "vllm_problem", lambda: None)
    EchoLLM.instances.clear()

    prompts = [Prompt(str(i), [{"role": "user", "content": t}]) for i, t in enumerate(["hello there", "why", "a b c"])]
    opts = SampleOptions(n=2, max_new_tokens=2, temperature=0.7, top_p=0.9, seed=4, batch_size=2, backend="vllm", device="cpu")
    frame, stats = sample_model(model, "m", prompts, opts, tmp_path / "parts")

    tok = load_tokenizer(model)
    (llm,) = EchoLLM.instances
    assert llm.model == str(model) and llm.seed == 4 and len(llm.calls) == 2  # one engine, one call per chunk
    sent = [p["prompt_token_ids"] for prompts_, _ in llm.calls for p in prompts_]
    # The transformers backend's prompt ids: the rendered prompt, tokenised without added special tokens.
    assert sent == [tok(render_prompt(tok, p.messages), add_special_tokens=False)["input_ids"] for p in prompts]
    params = [p for _, ps in llm.calls for p in ps]
    assert {(p.n, p.temperature, p.top_p, p.max_tokens) for p in params} == {(2, 0.7, 0.9, 2)}
    assert len({p.seed for p in params}) == 3 and tok.eos_token_id in params[0].stop_token_ids

    assert frame.schema == pl.Schema(RESPONSE_SCHEMA) and frame.height == 6
    for row, ids in zip(frame.iter_rows(named=True), [s for s in sent for _ in range(2)]):
        j = row["sample"]
        echoed = ids[-(j + 1):]
        if j == 0:  # one echoed token + the stop id fit max_new_tokens=2: the stop id is dropped
            assert row["tokens"] == echoed and row["finish_reason"] == "stop"
        else:  # two echoed tokens fill max_new_tokens before the stop id
            assert row["tokens"] == echoed and row["finish_reason"] == "length"
        assert row["response"] == tok.decode(row["tokens"], skip_special_tokens=True)
    assert stats["tokens"] == int(frame["n_tokens"].sum())
