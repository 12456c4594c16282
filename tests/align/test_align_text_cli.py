"""`fusekit align-text`: one text's target positions and where their rows come from, for both methods."""

from __future__ import annotations

from typer.testing import CliRunner

from fusekit.cli.app import app
from real_tokenizers import real_tokenizer

TEXT = "Price: 1234.56 dollars, naïve café"


def _tokenizer_files(tmp_path):
    paths = []
    for name in ("gpt-2", "llama-spm"):
        path = tmp_path / f"{name}.json"
        real_tokenizer(name).backend_tokenizer.save(str(path))
        paths.append(str(path))
    return paths


def test_bytespan_table_shows_how_each_target_token_is_reached(tmp_path):
    src, tgt = _tokenizer_files(tmp_path)
    result = CliRunner().invoke(app, ["align-text", TEXT, "-s", src, "-t", tgt], terminal_width=200)
    assert result.exit_code == 0, result.output
    # GPT-2's " 1234" pieces become Llama-2's single digits: one source token, several target rows (1:n).
    assert "1:n" in result.output and "1:1" in result.output
    assert "perfect-source recall on this text: 1.000" in result.output


def test_paper_methods_path_and_bad_input(tmp_path):
    src, tgt = _tokenizer_files(tmp_path)
    for method in ("fusellm", "fusechat"):  # 1:1 only: Llama-2's single digits of GPT-2's " 1234" fall back
        result = CliRunner().invoke(app, ["align-text", TEXT, "-s", src, "-t", tgt, "--method", method], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "fallback" in result.output and "1:n" not in result.output
    result = CliRunner().invoke(app, ["align-text", TEXT, "-s", src, "-t", tgt, "--path"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "vocabulary map:" in result.output and "DTW path of" in result.output
    missing = CliRunner().invoke(app, ["align-text", TEXT, "-s", str(tmp_path / "nope.json"), "-t", tgt])
    assert missing.exit_code != 0 and "no tokenizer" in missing.output and "Traceback" not in missing.output
    unknown = CliRunner().invoke(app, ["align-text", TEXT, "-s", src, "-t", tgt, "--method", "dtw"])
    assert unknown.exit_code != 0
    empty = CliRunner().invoke(app, ["align-text", "", "-s", src, "-t", tgt])
    assert empty.exit_code != 0 and "tokenises to nothing" in empty.output


def test_how_follows_exact_byte_spans_and_bad_text_is_one_line(tmp_path):
    src, tgt = _tokenizer_files(tmp_path)
    # Llama-2 has 好 as one token where GPT-2 splits its three bytes into pieces: n:1 by bytes, although
    # both tokenizers give those pieces the same character offset.
    result = CliRunner().invoke(app, ["align-text", "猫が好き ok", "-s", src, "-t", tgt], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "'好'" in line)
    assert "n:1" in row and "\\xe5" in row  # the source piece shown as its bytes
    bad = CliRunner().invoke(app, ["align-text", "caf\udce9", "-s", src, "-t", tgt])
    assert bad.exit_code != 0 and "not valid UTF-8" in bad.output and "Traceback" not in bad.output
    one = CliRunner().invoke(app, ["align-text", "hi", "-s", src, "-t", tgt])
    assert one.exit_code != 0 and "one target token" in one.output
