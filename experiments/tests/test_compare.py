"""`hmt compare` end to end on a tiny local backbone: every arm trained alike, scored alike, resumable."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from hmt.commands.comparison import ARMS, SETTINGS_ADDED_LATER, CompareRequest, summarise


def compare_args(tiny_model_dir, corpus, out, *extra: str) -> list[str]:
    return [
        "compare", "--out", str(out), "--backbone", str(tiny_model_dir), "--train-data", str(corpus),
        "--eval-data", str(corpus), "--eval-tokens", "120", "--dtype", "fp32", "--device", "cpu",
        "--segment-length", "16", "--num-sensory", "4", "--cache-size", "8", "--stage1-steps", "2",
        "--stage2-steps", "2", "--stage2-unroll", "3", *extra,
    ]  # fmt: skip


def test_every_arm_is_trained_alike_and_scored_alike(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = run_cli(monkeypatch, capsys, *compare_args(tiny_model_dir, corpus, out))
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
    # Each evaluation scored the same tokens with the arm's own mode.
    scored = set()
    for folder in (out / "seed-0" / "eval").iterdir():
        result = json.loads((folder / "results.json").read_text())
        (mode,) = result["modes"]
        assert mode == ARMS[folder.name.split("-")[0]][2]
        scored.add(result["modes"][mode]["tokens_scored"])
    assert len(scored) == 1
    assert report["summary"]["sliding/carried"][data]["gap_closed"] == pytest.approx(0.0)
    assert "untouched backbone, full context" in (out / "comparison.md").read_text()
    assert set(report["summary"]["hmt/reset"][data]) >= {"ppl", "segment_starts"}
    assert "· starts " in (out / "comparison.md").read_text()

    # Run again: everything is kept, nothing retrained; other settings in the same folder are refused.
    code, stdout, err = run_cli(monkeypatch, capsys, *compare_args(tiny_model_dir, corpus, out))
    assert code == 0, err
    assert stdout.count("finished, kept") == 2 * len(ARMS)
    assert json.loads((out / "comparison.json").read_text())["summary"] == report["summary"]
    # --no-train reports what is there: seed 1 was never trained, so it is left out, not trained.
    args = compare_args(tiny_model_dir, corpus, out, "--no-train", "--arms", "windowed,hmt", "--seeds", "0,1")
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "seed 1, hmt: not trained, left out" in " ".join(stdout.split())
    report = json.loads((out / "comparison.json").read_text())
    assert set(report["runs"]) == {"0"} and set(report["runs"]["0"]) == {"windowed", "hmt"}
    assert not (out / "seed-1").exists()
    code, _, err = run_cli(monkeypatch, capsys, *compare_args(tiny_model_dir, corpus, out, "--lr", "0.01"))
    assert code == 1 and "other settings (lr)" in err
    # A folder written before --memory-tokens, --memory-offset and --recall-recency existed used one
    # memory token, no offset and no recency prior: it continues as it was.
    settings = json.loads((out / "settings.json").read_text())
    for added_later in SETTINGS_ADDED_LATER:
        del settings[added_later]
    (out / "settings.json").write_text(json.dumps(settings))
    code, _, err = run_cli(monkeypatch, capsys, *compare_args(tiny_model_dir, corpus, out, "--no-train"))
    assert code == 0, err
    args = compare_args(tiny_model_dir, corpus, out, "--memory-tokens", "4")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (memory_tokens)" in err
    args = compare_args(tiny_model_dir, corpus, out, "--recall-recency", "0.25")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (recall_recency)" in err
    args = compare_args(tiny_model_dir, corpus, out, "--memory-offset")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (memory_offset)" in err
    args = compare_args(tiny_model_dir, corpus, out, "--memory-layer", "1")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (memory_layer)" in err
    args = compare_args(tiny_model_dir, corpus, out, "--stage2-reset-every", "8")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (stage2_reset_every)" in err
    args = compare_args(tiny_model_dir, corpus, out, "--distill-weight", "1")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "other settings (distill_weight)" in err


def test_summary_averages_seeds_and_measures_the_gap_closed():
    def run(sliding: float, hmt: float) -> dict:
        return {
            "sliding": {"eval": {"t": {"carried": sliding}}},
            "hmt": {"eval": {"t": {"carried": hmt, "reset": hmt + 1}}},
        }

    runs = {"0": run(30.0, 26.0), "1": run(32.0, 28.0)}
    runs["0"]["hmt"]["eval"]["t"] |= {"carried_starts": 40.0, "reset_starts": 45.0}
    runs["1"]["hmt"]["eval"]["t"] |= {"carried_starts": 42.0}  # seed 1's reset run predates them
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
        ({"recall_recency": -1.0}, "recall-recency"),
        ({"stage2_reset_every": 0}, "stage2-reset-every"),
        ({"recall_recency": float("nan")}, "recall-recency"),
        ({"distill_weight": -1.0}, "distill-weight"),
        ({"distill_context": 0}, "distill-context"),
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
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "sliding: frozen backbone and no HMT parameters, nothing to train" in " ".join(stdout.split())
    runs = json.loads((out / "comparison.json").read_text())["runs"]["0"]
    assert runs["sliding"]["training"]["tokens"] == 0
    assert runs["memory_off"]["training"]["tokens"] > 0
    assert not (out / "seed-0" / "sliding").exists()
    # --no-train still reports the untrained arm.
    code, _, err = run_cli(monkeypatch, capsys, *args, "--no-train")
    assert code == 0, err
    assert set(json.loads((out / "comparison.json").read_text())["runs"]["0"]) == {"sliding", "memory_off"}


def test_stage2_reset_reaches_the_streaming_stage_only_and_distillation_both(monkeypatch, tmp_path):
    from rich.console import Console

    from hmt.commands import comparison

    requests = []
    monkeypatch.setattr(comparison, "run_train_command", lambda request, console: requests.append(request))
    request = CompareRequest(
        out=tmp_path, stage2_reset_every=64, memory_offset=True, distill_weight=0.5, distill_positions=32
    )
    for streaming in (False, True):
        comparison._train_once(request, tmp_path / str(streaming), "hmt", 4, 2, 0, None, streaming, Console())
    assert [r.train["reset_every"] for r in requests] == [None, 64]
    assert all(r.model["memory_offset"] is True for r in requests)  # a model setting: both stages
    # Distillation, like the data and the steps, is the same in both stages (and every arm).
    assert all(
        (r.train["distill_weight"], r.train["distill_context"], r.train["distill_positions"])
        == (0.5, 768, 32)
        for r in requests
    )
