"""`fusekit eval --tasks`: lm-evaluation-harness on models fusekit loads, against lm-eval's own CLI.

One tiny Llama, saved as a folder and written as a GGUF file with the same weights; two local tasks
(multiple choice and generation) whose data are JSONL files. lm-eval's CLI evaluates the folder;
`fusekit eval` evaluates the folder and the .gguf in one call: every metric and sample count must be
the CLI's.
"""

from __future__ import annotations

import json
import random
import sys

import pytest

pytest.importorskip("lm_eval", reason="pip install 'fusekit[eval]'")

from typer.testing import CliRunner  # noqa: E402

from fusekit import zoo  # noqa: E402
from fusekit.cli import app  # noqa: E402
from gguf_files import write_llama_gguf  # noqa: E402

MC_ITEMS, GEN_ITEMS = 24, 10

MC_YAML = """task: tiny_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""

GEN_YAML = """task: tiny_complete
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


@pytest.fixture(scope="module")
def setup(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model = zoo.build_tiny_model("llama", tokenizers_by_kind["bpe"], root / "tiny", hidden=32, layers=1, context=128)
    gguf = write_llama_gguf(model, root / "tiny.gguf")
    lines = [ln.strip() for t in corpus_texts for ln in t.splitlines() if 20 <= len(ln.strip()) <= 70]
    rng = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir()
    with (tasks / "next_line.jsonl").open("w") as f:
        for _ in range(MC_ITEMS):
            i = rng.randrange(1, len(lines))
            choices = [lines[i], *rng.sample(lines, 3)]
            rng.shuffle(choices)
            f.write(json.dumps({"context": lines[i - 1], "choices": choices, "label": choices.index(lines[i])}) + "\n")
    with (tasks / "complete.jsonl").open("w") as f:
        for _ in range(GEN_ITEMS):
            line = lines[rng.randrange(len(lines))]
            f.write(json.dumps({"prompt": line[: len(line) // 2], "answer": line[len(line) // 2 :]}) + "\n")
    (tasks / "next_line.yaml").write_text(MC_YAML.format(data=tasks / "next_line.jsonl"))
    (tasks / "complete.yaml").write_text(GEN_YAML.format(data=tasks / "complete.jsonl"))
    return {"model": model, "gguf": gguf, "tasks": tasks, "root": root}


def lm_eval_cli(setup, monkeypatch) -> dict:
    """lm-eval's own command line (`lm-eval run …`, its argument parsing and its results file)."""
    from lm_eval.__main__ import cli_evaluate

    out = setup["root"] / "cli"
    argv = [
        "lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={setup['model']},dtype=float32",
        "--tasks", "tiny_next_line,tiny_complete", "--include_path", str(setup["tasks"]),
        "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cli_evaluate()
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text())


def test_matches_lm_evals_cli_for_a_folder_and_a_gguf(setup, monkeypatch, tmp_path):
    want = lm_eval_cli(setup, monkeypatch)
    assert want["n-samples"]["tiny_next_line"]["effective"] == MC_ITEMS
    assert want["n-samples"]["tiny_complete"]["effective"] == GEN_ITEMS

    out = tmp_path / "fk"
    run = CliRunner().invoke(app, [
        "eval", "--model", str(setup["model"]), "--model", str(setup["gguf"]), "--tasks", "tiny_next_line",
        "--tasks", "tiny_complete", "--include-path", str(setup["tasks"]), "--device", "cpu", "--batch-size", "4",
        "--out", str(out), "--json",
    ])
    assert run.exit_code == 0, run.output
    for label in ("tiny", "tiny.gguf"):
        got = json.loads((out / f"{label}.json").read_text())
        assert got["n-samples"] == want["n-samples"]
        for task in ("tiny_next_line", "tiny_complete"):
            metrics = {k: v for k, v in want["results"][task].items() if "," in k}
            assert metrics  # acc, acc_norm, their stderrs; exact_match and its stderr
            assert {k: got["results"][task][k] for k in metrics} == metrics, (label, task)
    rows = json.loads(run.stdout[run.stdout.index("{"):])["tasks"]
    assert {(r["model"], r["task"], r["metric"]) for r in rows} == {
        (m, t, k) for m in ("tiny", "tiny.gguf") for t, ks in (("tiny_next_line", ("acc", "acc_norm")), ("tiny_complete", ("exact_match",))) for k in ks
    }
    for r in rows:
        assert r["value"] == want["results"][r["task"]][f"{r['metric']},none"]
        assert r["samples"] == (MC_ITEMS if r["task"] == "tiny_next_line" else GEN_ITEMS)
    assert "| tiny.gguf |" in (out / "tasks.md").read_text()


def test_bad_task_input_is_one_clear_line(setup, tmp_path, monkeypatch):
    runner = CliRunner()
    base = ["eval", "--model", str(setup["model"]), "--out", str(tmp_path / "o")]

    missing = tmp_path / "tasks"
    missing.mkdir()
    (missing / "t.yaml").write_text(MC_YAML.format(data=tmp_path / "gone.jsonl"))
    run = runner.invoke(app, [*base, "--tasks", "tiny_next_line", "--include-path", str(missing)])
    assert run.exit_code == 1
    assert f"task tiny_next_line: its data file {tmp_path / 'gone.jsonl'} does not exist" in run.output

    run = runner.invoke(app, [*base, "--tasks", "tiny_next_lin", "--include-path", str(setup["tasks"])])
    assert run.exit_code == 1
    assert "unknown task 'tiny_next_lin'" in run.output and "close names in lm-eval's task list: tiny_next_line" in run.output

    run = runner.invoke(app, [*base, "--tasks", "tiny_next_line", "--include-path", str(tmp_path / "nowhere")])
    assert run.exit_code == 1 and "no such folder" in run.output

    run = runner.invoke(app, base)  # nothing to evaluate: one `error:` line like every other mistake
    assert run.exit_code == 1 and "error: nothing to evaluate" in run.output and "--data" in run.output

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    run = runner.invoke(app, [*base, "--tasks", "tiny_next_line", "--include-path", str(setup["tasks"])])
    assert run.exit_code == 1
    assert "pip install 'fusekit[eval]'" in run.output
    assert len([ln for ln in run.output.splitlines() if ln.strip()]) == 1
