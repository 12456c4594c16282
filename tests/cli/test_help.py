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


def test_options_of_a_fixed_set_list_their_values():
    """train's and distill's choice options show the values the config accepts, not `<str>`; a value
    listed there is accepted by the config, one outside it is refused."""
    import re

    import pytest

    from fusekit.cli.metavars import one_of
    from fusekit.train.config import TrainConfig, TrainConfigError, build_config

    for command, options in (("train", ["--loss", "--dtype", "--lam-schedule", "--loss-on", "--fused-head", "--report-to", "--preset", "--granularity"]),
                             ("distill", ["--loss", "--granularity"])):
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        for option in options:
            shown = re.search(rf"{option} (\S+)", result.output)
            assert shown and shown.group(1).startswith("[") and shown.group(1).endswith("]"), (command, option, result.output)
            values = shown.group(1)[1:-1].split("|")
            field = option[2:].replace("-", "_")
            assert len(values) >= 2
            value = values if field == "report_to" else values[-1]
            assert getattr(build_config(None, **{field: value}), field) == value
            with pytest.raises(TrainConfigError):
                build_config(None, **{field: "no-such-value"})
    with pytest.raises(TypeError, match="not a Literal"):
        one_of(TrainConfig, "lr")
