"""The README's library example runs and shows what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "chunked == one call: True" in result.stdout
    assert "saved == loaded: True" in result.stdout


def test_lm_eval_document_task_example_writes_a_task(tmp_path):
    import pytest

    pytest.importorskip("lm_eval")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("A long document. " * 20)
    (texts / "b.md").write_text("Another one. " * 20)
    script = EXAMPLE.parent / "lm_eval" / "document_task.py"
    out = tmp_path / "tasks"
    command = [sys.executable, str(script), "--data", str(texts), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "(2 documents)" in result.stdout and "--tasks texts_all" in result.stdout
    assert (out / "texts_all.yaml").is_file() and len((out / "texts_all.jsonl").read_text().splitlines()) == 2
