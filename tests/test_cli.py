"""The `hmt` command: help, adapter inspection, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from conftest import tiny_hmt
from hmt.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.output and "version" in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.startswith("hmt 0.")


def test_inspect_shows_settings_and_tensors(tmp_path):
    tiny_hmt("llama").save_pretrained(tmp_path)
    result = runner.invoke(app, ["inspect", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "segment_length" in result.output and "summary_prompt" in result.output
    assert "llama" in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "hmt_config.json").write_text('{"segment_length": 0}')
    result = subprocess.run(
        [sys.executable, "-m", "hmt.cli", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "segment_length must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_is_light():
    code = "import sys, hmt; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; print(heavy)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
