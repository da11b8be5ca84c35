"""`hmt bench` on a tiny local backbone: every (length, mode) measured in its own process, reported alike."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from hmt.bench import BenchConfig, PeakMemory


def test_bench_measures_every_mode_and_length(monkeypatch, capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench", "--out", str(out), "--backbone", str(tiny_model_dir), "--modes", "backbone,hmt,full",
        "--lengths", "64,256", "--segment-length", "16", "--num-sensory", "4", "--cache-size", "8",
        "--full-window", "128", "--dtype", "fp32", "--device", "cpu",
    ]  # fmt: skip
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    assert [(r["tokens"], r["mode"]) for r in rows] == [
        (64, "backbone"), (64, "hmt"), (64, "full"), (256, "backbone"), (256, "hmt"), (256, "full"),
    ]  # fmt: skip
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["seconds"] > 0
        assert row["memory"] == "rss" and row["peak_mb"] >= row["model_mb"] > 0
        assert row["speed_vs_backbone"] == pytest.approx(
            row["tokens_per_second"]
            / next(r for r in rows if r["tokens"] == row["tokens"] and r["mode"] == "backbone")[
                "tokens_per_second"
            ]
        )
    assert report["settings"]["settings"]["segment_length"] == 16 and report["settings"]["full_window"] == 128
    assert {row["model_config"]["segment_length"] for row in rows} == {16}  # what was measured
    assert (out / "bench.png").stat().st_size > 0
    assert "vs backbone" in stdout
    # An existing report is not overwritten without --overwrite.
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "--overwrite" in err


def test_peak_memory_sees_a_buffer_freed_inside_the_block():
    with PeakMemory(torch.device("cpu")) as watcher:
        buffer = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del buffer
    assert watcher.peak_mb - watcher.start_mb > 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modes": ("hmt", "lstm")}, "unknown mode"),
        ({"lengths": (1,)}, "at least 2"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_bench_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_bench_generate_measures_both_generators_and_a_long_read(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    out = tmp_path / "gen"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "bench", "--generate", "--out", str(out), "--backbone", str(tiny_model_dir),
        "--segment-length", "16", "--num-sensory", "4", "--new-tokens", "40", "--read-tokens", "300",
        "--repeats", "2", "--dtype", "fp32", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "generate.json").read_text())
    generation = report["generation"]
    assert generation["new_tokens"] == 40 and generation["prompt_tokens"] == 20
    assert set(generation["tokens_per_second"]) == {"transformers", "hmt"}
    assert generation["hmt_vs_transformers"] > 0
    assert generation["read"]["tokens"] == 300 and generation["read"]["seconds"] > 0
    read = generation["read"]
    assert read["vs_backbone_body"] == pytest.approx(read["seconds"] / read["backbone_body_seconds"])
    assert "vs transformers" in stdout and "read 300 tokens" in stdout and "body alone" in stdout
