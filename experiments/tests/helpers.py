"""Running an experiment's command in-process, as `python -m experiments.<tool>` would."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_tool(monkeypatch, capsys, main: Callable[[], None], *args: str) -> tuple[int, str, str]:
    """Call `main` with ARGS as the command line; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["experiment", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
