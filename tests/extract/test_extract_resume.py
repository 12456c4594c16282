"""Crash safety of `fusekit extract`: kill -9 and resume, corrupt shards, a full disk; `fusekit inspect`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import fusekit
from fusekit import zoo
from fusekit.cli import app
from fusekit.extract import ExtractStore, StoreError

ARGS = dict(top_k=5, max_length=12, batch_size=1, num_shards=4)


@pytest.fixture(scope="module")
def model_dir(tokenizers_by_kind, tmp_path_factory):
    return zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], tmp_path_factory.mktemp("m") / "gpt2", hidden=32, context=64)


@pytest.fixture(scope="module")
def corpus_file(corpus_texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "d.txt"
    path.write_text("\n".join(t.replace("\n", " ")[:700] for t in corpus_texts[:16]) + "\n")
    return path


def cli_args(model_dir, corpus_file, out) -> list[str]:
    return [
        "extract", "--model", str(model_dir), "--data", str(corpus_file), "--out", str(out), "--top-k", "5",
        "--max-length", "12", "--batch-size", "1", "--num-shards", "4", "--no-progress",
    ]


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_kill_9_mid_run_then_resume_gives_identical_files(model_dir, corpus_file, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusekit.cli", *cli_args(model_dir, corpus_file, killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not (killed / "part-00000-of-00004.parquet.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the first shard never completed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = ExtractStore(killed)
    assert not before.complete(), "the run finished before it could be killed"
    # what a kill can also leave: a temporary of a dead job, a shard renamed but not yet recorded
    (killed / ".part-00003-of-00004.parquet.tmp-999999").write_bytes(b"partial")
    (killed / "part-00000-of-00004.parquet.json").unlink()

    fusekit.run_extract(model_dir, corpus_file, killed, progress=False, **ARGS).out
    clean = fusekit.run_extract(model_dir, corpus_file, tmp_path / "clean", progress=False, **ARGS).out
    got, want = files(killed), files(clean)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after resume"
    assert ExtractStore(killed).complete()
    # a re-run of a complete store does nothing and changes nothing
    fusekit.run_extract(model_dir, corpus_file, killed, progress=False, **ARGS).out
    assert files(killed) == want


def test_inspect_reports_and_detects_a_corrupt_shard(model_dir, corpus_file, tmp_path):
    out = fusekit.run_extract(model_dir, corpus_file, tmp_path / "s", progress=False, **ARGS).out
    runner = CliRunner()
    ok = runner.invoke(app, ["inspect", str(out)])
    assert ok.exit_code == 0, ok.output
    for words in ("fusekit.extract", "bytes/token", "mean KL", "CE of the next token", "every shard present and intact"):
        assert words in ok.output.replace("\n", " ")
    shard = out / "part-00002-of-00004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["inspect", str(out)])
    assert bad.exit_code == 1
    assert "part-00002-of-00004.parquet: sha256 mismatch" in bad.output.replace("\n", " ")
    store = ExtractStore(out)
    with pytest.raises(StoreError, match="part-00002-of-00004.parquet: sha256 mismatch"):
        store.complete()  # corrupt is not "incomplete": the file is named
    with pytest.raises(StoreError, match="part-00002-of-00004.parquet: sha256 mismatch"):
        list(store.iter_texts())


def test_inspect_incomplete_store_exits_2_and_unknown_folder_exits_1(model_dir, corpus_file, tmp_path):
    out = fusekit.run_extract(model_dir, corpus_file, tmp_path / "s", shard="1/4", progress=False, **{**ARGS, "num_shards": None}).out
    runner = CliRunner()
    partial = runner.invoke(app, ["inspect", str(out)])
    assert partial.exit_code == 2 and "missing shard" in partial.output
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "not a fusekit store" in missing.output
    with pytest.raises(StoreError, match="not extracted yet"):
        list(ExtractStore(out).iter_texts())


def test_a_full_disk_names_the_path_and_leaves_nothing_under_final_names(model_dir, corpus_file, tmp_path):
    """RLIMIT_FSIZE makes writes past 12 kB fail with EFBIG, as a full disk fails with ENOSPC."""
    out = tmp_path / "s"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))\n"
        "from fusekit.cli import main\n"
        "sys.argv = ['fusekit'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = cli_args(model_dir, corpus_file, out)
    args[args.index("--num-shards") + 1] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and "part-00000-of-00001.parquet" in proc.stderr
    assert not (out / "part-00000-of-00001.parquet").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_moved_model_folder_resumes_its_store(model_dir, corpus_file, tmp_path, tokenizers_by_kind):
    """The store identifies a model by its config and weights, not by where the folder lies."""
    import shutil

    out = tmp_path / "store"
    fusekit.run_extract(model_dir, corpus_file, out, progress=False, **ARGS).out
    written = files(out)
    moved = shutil.copytree(model_dir, tmp_path / "elsewhere" / model_dir.name)
    fusekit.run_extract(moved, corpus_file, out, progress=False, **ARGS).out
    assert files(out) == written
    # …while the same architecture and tokenizer with other weights is still refused
    other = zoo.build_tiny_model("gpt2", tokenizers_by_kind["bpe"], tmp_path / "x" / model_dir.name, hidden=32, context=64, seed=1)
    with pytest.raises(StoreError, match="other settings"):
        fusekit.run_extract(other, corpus_file, out, progress=False, **ARGS).out
