"""The controlled comparison end to end on a tiny local backbone: every arm trained alike, scored alike,
resumable."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_main as run_tool
from experiments import compare
from experiments.compare import ARMS, CompareRequest, main, summarise
from experiments.distill import Distillation


def compare_args(tiny_model_dir, corpus, out, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--backbone", str(tiny_model_dir), "--train-data", str(corpus),
        "--eval-data", str(corpus), "--eval-tokens", "120", "--dtype", "fp32", "--device", "cpu",
        "--segment-length", "16", "--num-sensory", "4", "--cache-size", "8", "--stage1-steps", "2",
        "--stage2-steps", "2", "--stage2-unroll", "3", *extra,
    ]  # fmt: skip


def test_every_arm_is_trained_alike_and_scored_alike(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = run_tool(monkeypatch, capsys, main, *compare_args(tiny_model_dir, corpus, out))
    assert code == 0, err
    report = json.loads((out / "comparison.json").read_text())
    runs = report["runs"]["0"]
    assert set(runs) == set(ARMS)
    expected_tokens = 2 * 16 * (2 * 2 + 2 * 3)
    assert report["settings"]["tokens_per_arm"] == expected_tokens
    assert {arm: r["training"]["tokens"] for arm, r in runs.items()} == dict.fromkeys(ARMS, expected_tokens)
    data = str(corpus)
    for arm, r in runs.items():
        variants = {key for key in r["eval"][data] if "_" not in key}  # not carried_recall, carried_starts
        assert variants == ({"carried", "reset"} if arm in ("rmt", "hmt") else {"carried"}), arm
        trained = json.loads((out / "seed-0" / arm / "summary.json").read_text())["train_config"]
        assert trained["mode"] == ARMS[arm][1] and trained["streaming"] and trained["max_steps"] == 2
    stage1 = json.loads((out / "seed-0" / "stage1-rmt" / "summary.json").read_text())["train_config"]
    assert stage1["mode"] == "rmt" and not stage1["streaming"] and stage1["unroll"] == "2"
    # Each evaluation scored the same tokens with the arm's own mode and the arm's own adapter.
    scored = set()
    for folder in (out / "seed-0" / "eval").iterdir():
        result = json.loads((folder / "results.json").read_text())
        (mode,) = result["modes"]
        arm = folder.name.split("-")[0]
        assert mode == ARMS[arm][2]
        assert result["adapter"] == str(out / "seed-0" / arm / "final")
        assert result["config"]["reset_every"] == (3 if folder.name.endswith("-reset") else None)
        scored.add(result["modes"][mode]["tokens_scored"])
    assert len(scored) == 1
    (reference,) = (out / "eval-full").iterdir()
    reference = json.loads((reference / "results.json").read_text())
    assert list(reference["modes"]) == ["full"] and reference["adapter"] is None  # the untouched backbone
    assert reference["modes"]["full"]["tokens_scored"] in scored
    assert report["summary"]["sliding/carried"][data]["gap_closed"] == pytest.approx(0.0)
    assert "untouched backbone, full context" in (out / "comparison.md").read_text()
    assert set(report["summary"]["hmt/reset"][data]) >= {"ppl", "segment_starts"}
    assert "· starts " in (out / "comparison.md").read_text()

    # Run again: everything is kept, nothing retrained; other settings in the same folder are refused.
    code, stdout, err = run_tool(monkeypatch, capsys, main, *compare_args(tiny_model_dir, corpus, out))
    assert code == 0, err
    assert " ".join(stdout.split()).count("finished, kept") == 2 * len(ARMS)
    assert json.loads((out / "comparison.json").read_text())["summary"] == report["summary"]
    # --no-train reports what is there: seed 1 was never trained, so it is left out, not trained.
    args = compare_args(tiny_model_dir, corpus, out, "--no-train", "--arms", "windowed,hmt", "--seeds", "0,1")
    code, stdout, err = run_tool(monkeypatch, capsys, main, *args)
    assert code == 0, err
    assert "seed 1, hmt: not trained, left out" in " ".join(stdout.split())
    report = json.loads((out / "comparison.json").read_text())
    assert set(report["runs"]) == {"0"} and set(report["runs"]["0"]) == {"windowed", "hmt"}
    assert not (out / "seed-1").exists()
    for option, value, setting in (
        ("--lr", "0.01", "lr"),
        ("--memory-tokens", "4", "memory_tokens"),
        ("--cache-size", "6", "cache_size"),
        ("--distill-weight", "1", "distill_weight"),
    ):
        args = compare_args(tiny_model_dir, corpus, out, option, value)
        code, _, err = run_tool(monkeypatch, capsys, main, *args)
        assert code == 1 and f"other settings ({setting})" in err, option
    # An interrupted run continues from its last checkpoint (its final adapter not yet written).
    shutil.rmtree(out / "seed-0" / "hmt" / "final")
    (out / "seed-0" / "hmt" / "summary.json").unlink()
    args = compare_args(tiny_model_dir, corpus, out, "--arms", "hmt")
    code, stdout, err = run_tool(monkeypatch, capsys, main, *args)
    assert code == 0, err
    assert "resuming in" in " ".join(stdout.split())
    assert (out / "seed-0" / "hmt" / "final" / "hmt_config.json").is_file()


def test_options_removed_from_the_library_are_refused(monkeypatch, capsys, tmp_path):
    for option in ("--memory-offset", "--recall-recency", "--stage2-reset-every"):
        code, _, err = run_tool(monkeypatch, capsys, main, "--out", str(tmp_path), option, "1")
        assert code == 2 and "No such option" in err, option
    # A folder written with settings that no longer exist is another experiment: refused, not adapted.
    out = tmp_path / "old"
    out.mkdir()
    request = CompareRequest(out=out)
    compare.check_same_settings(request)
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**settings, "memory_offset": False}))
    with pytest.raises(ValueError, match=r"other settings \(memory_offset\)"):
        compare.check_same_settings(request)


def test_summary_averages_seeds_and_measures_the_gap_closed():
    def run(sliding: float, hmt: float) -> dict:
        return {
            "sliding": {"eval": {"t": {"carried": sliding}}},
            "hmt": {"eval": {"t": {"carried": hmt, "reset": hmt + 1}}},
        }

    runs = {"0": run(30.0, 26.0), "1": run(32.0, 28.0)}
    runs["0"]["hmt"]["eval"]["t"] |= {"carried_starts": 40.0, "reset_starts": 45.0}
    runs["1"]["hmt"]["eval"]["t"] |= {"carried_starts": 42.0}  # seed 1's reset run lacks them
    summary = summarise(runs, {"t": 21.0}, ("t",))
    assert summary["hmt/carried"]["t"] == pytest.approx(
        {"ppl": 27.0, "spread": 2.0, "seeds": 2, "gap_closed": 0.4, "segment_starts": 41.0}
    )
    assert summary["hmt/reset"]["t"]["ppl"] == pytest.approx(28.0)
    assert "segment_starts" not in summary["hmt/reset"]["t"]  # one seed's would pass for the mean


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arms": ("hmt", "lstm")}, "unknown arm"),
        ({"seeds": ()}, "at least one seed"),
        ({"stage2_steps": 0}, "stage2-steps"),
        ({"distill_weight": -1.0}, "distill-weight"),
        ({"distill_weight": float("nan")}, "distill-weight"),
        ({"distill_context": 0}, "distill-context"),
        ({"distill_positions": 0}, "distill-positions"),
        ({"memory_tokens": 0}, "memory_tokens must be >= 1"),
    ],
)
def test_bad_requests(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompareRequest(out=tmp_path, **kwargs)


def test_frozen_backbone_scores_the_parameterless_arms_untrained(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    out = tmp_path / "frozen"
    frozen = ("--finetune", "frozen", "--arms", "sliding,memory_off", "--attention-sink")
    args = compare_args(tiny_model_dir, corpus, out, *frozen)
    code, stdout, err = run_tool(monkeypatch, capsys, main, *args)
    assert code == 0, err
    assert "sliding: frozen backbone and no HMT parameters, nothing to train" in " ".join(stdout.split())
    runs = json.loads((out / "comparison.json").read_text())["runs"]["0"]
    assert runs["sliding"]["training"]["tokens"] == 0
    assert runs["memory_off"]["training"]["tokens"] > 0
    assert not (out / "seed-0" / "sliding").exists()
    # --no-train still reports the untrained arm.
    code, _, err = run_tool(monkeypatch, capsys, main, *args, "--no-train")
    assert code == 0, err
    assert set(json.loads((out / "comparison.json").read_text())["runs"]["0"]) == {"sliding", "memory_off"}


def test_both_stages_get_the_model_settings_and_distillation_and_only_stage2_streams(monkeypatch, tmp_path):
    from rich.console import Console

    calls = []
    monkeypatch.setattr(
        compare, "train_run", lambda out, settings, config, **kw: calls.append((settings, config, kw))
    )
    request = CompareRequest(out=tmp_path, memory_tokens=2, distill_weight=0.5, distill_positions=32)
    compare.train_stage(request, tmp_path / "stage1", "rmt", 2, 3, 0, None, Console())
    compare.train_stage(request, tmp_path / "stage2", "hmt", 4, 5, 0, tmp_path / "stage1", Console())
    assert [c.streaming for _, c, _ in calls] == [False, True]
    assert [(c.mode, c.unroll, c.max_steps) for _, c, _ in calls] == [("rmt", "2", 3), ("hmt", "4", 5)]
    assert [s.init_from for s, _, _ in calls] == [None, tmp_path / "stage1"]
    assert all(s.model["memory_tokens"] == 2 for s, _, _ in calls)  # a model setting: both stages
    assert [kw["resume"] for _, _, kw in calls] == [False, False]
    # Distillation, like the data and the steps, is the same in both stages (and every arm), each run
    # with its own history.
    terms = [kw["auxiliary"] for _, _, kw in calls]
    assert all(isinstance(t, Distillation) for t in terms) and terms[0] is not terms[1]
    assert all((t.weight, t.context, t.positions) == (0.5, 768, 32) for t in terms)
    calls.clear()
    compare.train_stage(CompareRequest(out=tmp_path), tmp_path / "plain", "rmt", 2, 3, 0, None, Console())
    assert calls[0][2]["auxiliary"] is None  # weight 0: no teacher pass at all
