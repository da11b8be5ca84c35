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


CHAT = ["chat", "--segment-length", "16", "--num-sensory", "4", "--dtype", "fp32", "--device", "cpu"]


def test_chat_ends_cleanly_when_stdin_is_closed(tiny_model_dir, tmp_path):
    """`hmt chat ... 0<&-`: no sys.stdin at all. It ends at once with a short message, no traceback."""
    command = [sys.executable, "-m", "hmt.cli", *CHAT, "--backbone", str(tiny_model_dir),
               "--sessions", str(tmp_path)]  # fmt: skip
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" 0<&-', "sh", *command], capture_output=True, text=True, check=False, timeout=300
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "stdin is closed or cannot be read: chat ended" in result.stdout
    assert "Traceback" not in result.stderr


def test_chat_ends_cleanly_at_end_of_input_or_on_an_unreadable_stdin(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    import io

    from conftest import run_cli

    closed = io.StringIO("hello\n")
    closed.close()
    for stdin, message in (
        (io.StringIO(""), "(end of input: chat ended)"),  # < /dev/null, or Ctrl-D
        (None, "(stdin is closed or cannot be read: chat ended)"),
        (closed, "(stdin is closed or cannot be read: chat ended)"),
    ):
        monkeypatch.setattr(sys, "stdin", stdin)
        code, out, err = run_cli(monkeypatch, capsys, *CHAT, "--backbone", str(tiny_model_dir),
                                 "--sessions", str(tmp_path))  # fmt: skip
        assert code == 0 and message in out and "hmt> " not in out, (out, err)
