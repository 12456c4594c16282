"""Faults and bad input, as a new user meets them: each is one `error:` line naming the thing and what to
do, a non-zero exit, no traceback and nothing half-written (issue 18). Tiny real models, real stores."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fusekit
from fusekit import zoo
from fusekit.cli import app
from fusekit.store.errors import StoreError

EXTRACT = dict(top_k=4, max_length=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def world(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    """Two tiny models with different tokenizers of the same size, their stores and an aligned store."""
    root = tmp_path_factory.mktemp("world")
    corpus = root / "d.txt"
    corpus.write_text("\n".join(t.replace("\n", " ")[:240] for t in corpus_texts[:8]) + "\n")
    gpt2 = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "models" / "gpt2", hidden=32, context=64)
    llama = zoo.build_tiny_model("llama", tokenizers_by_kind["unigram"], root / "models" / "llama", hidden=32, context=64, seed=1)
    big = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], root / "models" / "big", hidden=32, context=64, pad_vocab_to=900)
    e_gpt2 = fusekit.run_extract(gpt2, corpus, root / "e-gpt2", num_shards=2, **EXTRACT).out
    e_llama = fusekit.run_extract(llama, corpus, root / "e-llama", num_shards=2, **EXTRACT).out
    from fusekit.align.stage import align_store

    align_store(e_gpt2, [e_llama], root / "aligned", progress=False)
    return dict(root=root, corpus=corpus, gpt2=gpt2, llama=llama, big=big, e_gpt2=e_gpt2, e_llama=e_llama, aligned=root / "aligned")


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The result failed with an `error:` line that holds every needle, and no traceback."""
    text = result.output
    assert result.exit_code != 0, text
    assert "Traceback" not in text and result.exception is None or isinstance(result.exception, SystemExit), text
    line = next((ln for ln in text.splitlines() if ln.startswith("error:")), None)
    assert line is not None, text
    for needle in needles:
        assert needle in text, (needle, text)
    return line


# -- 1. training against a store aligned for another target


def test_train_refuses_a_store_aligned_for_another_target(world, tmp_path):
    # same vocabulary size (800), other tokens: would train silently on wrong ids
    line = one_line_error(run("train", "-m", world["llama"], "-a", world["aligned"], "-o", tmp_path / "t1", "--no-progress"), "tokenizer differs")
    assert "gpt2" in line and not (tmp_path / "t1" / "checkpoints").exists()
    # another vocabulary size: was an IndexError mid-step
    one_line_error(run("train", "-m", world["big"], "-a", world["aligned"], "-o", tmp_path / "t2", "--no-progress"), "predicts 900")
    assert not (tmp_path / "t2" / "checkpoints").exists()


# -- 2. a mistyped local path, and a hub id that cannot be reached


def test_a_mistyped_local_path_fails_fast_naming_it(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world["root"])
    t0 = time.monotonic()
    result = run("extract", "-m", "models/gtp", "-d", world["corpus"], "-o", tmp_path / "x", "--no-progress")
    assert time.monotonic() - t0 < 20
    one_line_error(result, "models/gtp", "did you mean", "models/gpt2")
    assert not (tmp_path / "x").exists()
    # a hub-like id that is neither local, nor cached, nor reachable (the tests run with HF_HUB_OFFLINE=1)
    one_line_error(run("extract", "-m", "nobody-here/no-such-model", "-d", world["corpus"], "-o", tmp_path / "y"), "nobody-here/no-such-model")
    assert not (tmp_path / "y").exists()


def test_recipe_validation_catches_a_mistyped_model_before_any_work(world, tmp_path):
    from fusekit.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        f"target: {{name: t, model: {world['root'] / 'models' / 'gpt2'}}}\n"
        f"sources: [{{name: s, model: {world['root'] / 'models' / 'lama'}}}]\n"
        f"corpus: {{name: c, data: {world['corpus']}}}\n"
    )
    with pytest.raises(RecipeError, match="did you mean .*models/llama"):
        load_recipe(recipe)
    one_line_error(run("run", recipe, "--no-progress"), "lama")
    assert not (tmp_path / "work").exists()


# -- 3./4. tokenizers: none at all, or no fast backend


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_model_folder_without_tokenizer_files_is_named(world, tmp_path, name):
    import shutil

    folder = tmp_path / "weights-only"
    shutil.copytree(world[name], folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    one_line_error(run("extract", "-m", folder, "-d", world["corpus"], "-o", tmp_path / "x", "--no-progress"), str(folder), "no tokenizer files")
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_without_a_fast_backend_is_named(world, tmp_path):
    import shutil

    folder = tmp_path / "byt5"
    shutil.copytree(world["gpt2"], folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))  # a pure-Python tokenizer
    one_line_error(run("extract", "-m", folder, "-d", world["corpus"], "-o", tmp_path / "x", "--no-progress"), "no fast backend", str(folder))
    assert not (tmp_path / "x").exists()


# -- 5. a manifest claiming absurdly many shards


@pytest.mark.parametrize("claim", [1_000_000, -3, "many"])
def test_inspect_and_readers_refuse_an_absurd_shard_count_at_once(world, tmp_path, claim):
    import shutil

    from fusekit.store.aligned_store import AlignedStore
    from fusekit.store.extract_store import ExtractStore

    for src, reader in ((world["e_gpt2"], ExtractStore), (world["aligned"], AlignedStore)):
        store = tmp_path / src.name
        shutil.copytree(src, store)
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["settings"]["num_shards"] = claim
        (store / "manifest.json").write_text(json.dumps(manifest))
        t0 = time.monotonic()
        result = run("inspect", store)
        assert time.monotonic() - t0 < 10
        one_line_error(result, "manifest.json", "num_shards")
        assert len(result.output.splitlines()) < 40
        with pytest.raises(StoreError, match="num_shards .* is not a shard count"):
            reader(store)


def test_many_missing_shards_are_counted_not_listed(world, tmp_path):
    out = fusekit.run_extract(world["gpt2"], world["corpus"], tmp_path / "s", shard="0/8", **EXTRACT).out
    result = run("inspect", out)
    assert result.exit_code == 2
    assert "7 missing" not in result.output and result.output.count(": missing shard") <= 11


# -- 6. an output folder nobody may write


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process really cannot write: chmod 555 (not for root), else a read-only sysfs folder."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel/software_nodes")):
        try:
            (candidate / ".probe").write_text("x")
        except OSError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
        else:
            (candidate / ".probe").unlink()
    pytest.skip("no unwritable empty folder here (root without a read-only /sys)")


@pytest.mark.parametrize("stage", ["extract", "align", "train"])
def test_a_read_only_output_folder_is_one_line(world, tmp_path, stage):
    ro = _read_only_folder(tmp_path)
    args = {
        "extract": ["extract", "-m", world["gpt2"], "-d", world["corpus"], "-o", ro, "--no-progress"],
        "align": ["align", "-t", world["e_gpt2"], "-s", world["e_llama"], "-o", ro, "--no-progress"],
        "train": ["train", "-m", world["gpt2"], "-a", world["aligned"], "-o", ro, "--no-progress", "--max-steps", "1"],
    }[stage]
    one_line_error(run(*args), str(ro))
    assert not any(ro.iterdir())


# -- 8. corrupt shards and edited manifests are named


def test_align_names_a_corrupt_shard_and_an_edited_manifest(world, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(world["e_llama"], src)
    shard = src / "part-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_line_error(run("align", "-t", world["e_gpt2"], "-s", src, "-o", tmp_path / "a", "--no-progress"), "sha256 mismatch")
    assert "part-00001-of-00002.parquet" in line and "missing" not in line

    edited = tmp_path / "edited"
    shutil.copytree(world["e_llama"], edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["settings"]["k"] = 5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(run("align", "-t", world["e_gpt2"], "-s", edited, "-o", tmp_path / "b", "--no-progress"), "manifest.json")
    assert "edited" in line and "not finished" not in line


def test_train_names_a_corrupt_aligned_shard(world, tmp_path):
    import shutil

    aligned = tmp_path / "aligned"
    shutil.copytree(world["aligned"], aligned)
    shard = next(aligned.glob("part-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(run("train", "-m", world["gpt2"], "-a", aligned, "-o", tmp_path / "t", "--no-progress"), shard.name, "sha256 mismatch")


# -- also: multi-line errors, logs outside a terminal, resume, shard count reuse, long-text warning


def test_a_multi_problem_error_keeps_one_problem_per_line(world, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"workdir: {tmp_path}\ntarget: {{name: t, model: {tmp_path / 'a'}}}\nsources: [{{name: s, model: {tmp_path / 'b'}}}]\ncorpus: {{name: c, data: {tmp_path / 'c.txt'}}}\n")
    result = run("run", recipe, "--no-progress")
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and lines[0].startswith("error:")
    assert sum("does not exist" in ln or "no model at" in ln for ln in lines[1:]) == 3, result.output


def test_extract_logs_a_line_per_shard_outside_a_terminal_and_reuses_the_shard_count(world, tmp_path):
    out = tmp_path / "s"
    first = run("extract", "-m", world["gpt2"], "-d", world["corpus"], "-o", out, "--num-shards", "3", "--max-length", "32")
    assert first.exit_code == 0, first.output
    for i in (1, 2, 3):
        assert f"shard {i}/3:" in first.output and "tokens/s" in first.output and "ETA" in first.output
    (out / "part-00001-of-00003.parquet").unlink()
    again = run("extract", "-m", world["gpt2"], "-d", world["corpus"], "-o", out, "--max-length", "32")  # no --num-shards
    assert again.exit_code == 0, again.output
    assert "shard 2/3:" in again.output and "shard 1/3:" not in again.output


def test_resume_says_the_step(world, tmp_path):
    out = tmp_path / "t"
    args = ["train", "-m", world["gpt2"], "-a", world["aligned"], "-o", out, "--no-progress", "--max-steps", "3", "--batch-size", "1", "--max-length", "32"]
    assert run(*args, "--stop-after", "2").exit_code == 0
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "from step 2 of 3" in resumed.output


def test_whole_texts_are_tokenised_without_the_too_long_warning(world, caplog):
    from transformers import AutoTokenizer

    from fusekit.corpus import Record, tokenize_record, tokenize_with_offsets

    tok = AutoTokenizer.from_pretrained(world["gpt2"])
    tok.model_max_length = 16
    long = Record(text="the quick brown fox jumps over the lazy dog " * 20, messages=None)
    warned = lambda: any("Token indices sequence length" in r.getMessage() for r in caplog.records)  # noqa: E731
    with caplog.at_level("WARNING"):
        ids, _ = tokenize_record(tok, long)
        assert len(tokenize_with_offsets(tok, long).input_ids) == len(ids) > 16
        assert not warned()
        tok(long.text)  # the plain call still warns: the test can see the warning
        assert warned()


def test_help_and_the_plan_table_fit_80_columns():
    import subprocess
    import sys

    # Every option name and every help word must be there in full (rich panels cut them with "…").
    code = (
        "import sys, typer; from typer.testing import CliRunner; from fusekit.cli import app\n"
        "group = typer.main.get_command(app)\n"
        "for cmd in sys.argv[1:]:\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'], terminal_width=80)\n"
        "    assert r.exit_code == 0, (cmd, r.output)\n"
        "    names = [o for prm in group.commands[cmd].params for o in [*prm.opts, *prm.secondary_opts] if o.startswith('--')]\n"
        "    missing = [o for o in names if o not in r.output]\n"
        "    wide = [ln for ln in r.output.splitlines() if len(ln) > 80]\n"
        "    print(cmd, len(missing) + len(wide), missing[:2], wide[:1])\n"
    )
    commands = ["demo", "run", "plan", "fusechat", "extract", "align", "train", "merge", "eval", "inspect"]
    out = subprocess.run(
        [sys.executable, "-c", code, *commands], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, check=True
    ).stdout
    assert [line.split(" ", 2)[1] for line in out.splitlines()] == ["0"] * len(commands), out

    from rich.console import Console

    from fusekit.plan import plan_table

    row = dict(tokens=123_456_789, windows=1_234_567, params=1.7e9, extract_bytes=2.5e9, extract_bytes_per_token=20.3,
               extract_flops=1.2e18, extract_seconds=12_345)
    plan = {
        "corpus": {"texts": 123_456, "sample_texts": 8}, "models": {"target-llama": row, "a-long-source-name": row},
        "align": dict(tokens=123_456_789, bytes=3e9, bytes_per_token=25.1, seconds=3000),
        "train": dict(variants=["a", "b", "c"], tokens_per_variant=123_456_789, bytes=4e9, flops=3e18, seconds=99_999),
        "eval": dict(datasets=["heldout"], flops=1e15), "total_bytes": 1.2e10,
    }
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(plan_table(plan))
    text = console.export_text()
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 80
    for cell in ("target-llama", "123.5M", "1.7B", "2.5 GB", "20.3", "1.2e18", "3.4 h", "12.0 GB"):
        assert cell in text, (cell, text)


def test_help_piped_to_a_file_rewraps_paragraphs():
    """Rich panels keep the docstrings' line breaks and render at 80 columns off a terminal, so lines broke
    mid-sentence in `fusekit demo --help | less`; off a terminal the plain help re-wraps them."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "fusekit.cli", "demo", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert "╭" not in out
    assert "API docs: GPT-NeoX + another BPE" in " ".join(out.split())  # one paragraph, whatever the width
    assert not any(line.rstrip().endswith("GPT-NeoX +") for line in out.splitlines())
