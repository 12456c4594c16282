"""The command line's own surface: --version, and help that names what a repeatable option takes."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from typer.testing import CliRunner

from fusekit.cli import app


def test_version_prints_the_installed_release():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fusekit {version('fusekit')}"


def test_version_works_from_the_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "fusekit.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fusekit ")


def test_repeatable_options_show_what_they_take_not_a_python_type():
    for command in (["align"], ["eval"], ["distill"], ["merge"], ["prepare"]):
        result = CliRunner().invoke(app, [*command, "--help"], terminal_width=120)
        assert result.exit_code == 0, result.output
        assert "list[" not in result.output.lower(), (command, result.output)


def test_extract_and_align_take_the_shard_count_under_both_spellings():
    for command in ("extract", "align"):
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=160)
        assert "--num-shards" in result.output and "--shards" in result.output, (command, result.output)


def test_the_console_script_prints_a_warning_as_one_line():
    # main() (the `fusekit` entry point) sets the format; a warning after it is one `warning:` line.
    code = (
        "import sys, warnings, fusekit.cli as c\n"
        "sys.argv = ['fusekit', '--version']\n"
        "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
        "warnings.warn('store of format 2')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("fusekit ")
    assert out.stderr == "warning: store of format 2\n"
