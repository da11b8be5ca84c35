"""benchmarks/serve_load.py: a short run against `hmt serve` on the tiny backbone, and its bookkeeping."""

from __future__ import annotations

import json

import pytest
from benchmarks import serve_load

# Malformed requests the server has always refused (docs/serve.md); each must have been answered 4xx.
REFUSED = serve_load.MALFORMED  # every malformed request the load test sends must get a 4xx
TARGETS = {
    "no_5xx",
    "no_exceptions",
    "no_unexpected_4xx",
    "no_lost_updates",
    "p99_16_tokens_vs_alone",
    "memory_flat",
    "malformed_answered_4xx",
    "answering_at_end",
}


def test_a_short_run_reports_every_measure_and_its_requests_succeed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = serve_load.main([
        "--backbone", str(tiny_model_dir), "--segment-length", "32", "--num-sensory", "4", "--clients", "2",
        "--duration", "10", "--warmup", "3", "--request-timeout", "60", "--out", str(out),
        "--", "--dtype", "fp32", "--device", "cpu",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code in (0, 1), printed  # 3: the server did not start
    report = json.loads(out.read_text())
    assert code == (0 if report["passed"] else 1)
    assert set(report["targets"]) == TARGETS and "targets" in printed
    for name, target in report["targets"].items():
        assert set(target) == {"value", "threshold", "passed"}, name
    assert report["passed"] == all(t["passed"] is not False for t in report["targets"].values())
    assert report["config"]["started_server"] and report["config"]["clients"] == 2

    # the load ran, and every valid request succeeded (or was turned away with 429)
    assert 9 <= report["elapsed_s"] < 80 and report["requests"] >= 20 and report["requests_per_s"] > 0
    kinds = report["kinds"]
    assert set(kinds) == set(serve_load.DEFAULT_MIX)
    valid = [k for k in kinds if k != "malformed"]
    assert sum(kinds[k]["ok"] for k in valid) >= 10
    for kind in valid:
        entry = kinds[kind]
        assert entry["ok"] + entry["rejected_429"] == entry["sent"], (
            kind,
            entry,
            report["errors"]["examples"],
        )
        if entry["ok"]:
            assert 0 < entry["latency_s"]["p50"] <= entry["latency_s"]["p99"] <= entry["latency_s"]["max"]
    errors = report["errors"]
    assert errors["5xx"] == 0 and errors["exceptions"] == 0 and errors["unexpected_4xx"] == 0, errors
    assert report["clients_stuck"] == 0

    # the 16-token completion, alone and under load
    timed = report["completion_16"]
    assert len(timed["alone_samples_s"]) == 5 and timed["alone_median_s"] > 0
    assert 0 < timed["completion_tokens"] <= 16
    if timed["under_load_n"]:
        assert timed["slowdown_p99"] == pytest.approx(
            timed["under_load_p99_s"] / timed["alone_median_s"], rel=1e-2
        )

    # sessions: every read acknowledged is in its session's record on disk
    sessions = report["sessions"]
    assert len(sessions) == 3 and report["lost_updates"] == 0
    for name, session in sessions.items():
        assert session["source"] == "disk" and session["listed"] is True, name
        assert session["acked_reads"] >= 1 and session["recorded_reads"] == session["acked_reads"], session
        assert session["recorded_tokens"] == session["acked_tokens"] > 0, session

    # malformed requests: every kind tried (the sweep), those always refused answered 4xx
    malformed = report["malformed"]
    assert set(malformed) == set(serve_load.MALFORMED) and all(m["sent"] >= 1 for m in malformed.values())
    for sub in REFUSED:
        assert malformed[sub]["answered_4xx"] + malformed[sub]["rejected_429"] == malformed[sub]["sent"], sub

    # the server's memory, sampled every second, and the server alive at the end
    memory = report["memory"]
    assert memory["measured"] and memory["samples"] >= 8 and memory["start_mb"] > 50
    assert memory["drift"] == pytest.approx(memory["end_mb"] / memory["after_warmup_mb"] - 1, abs=1e-3)
    assert report["alive_at_end"]["answering"] and report["alive_at_end"]["models_status"] == 200


def test_lost_updates_are_acknowledged_reads_missing_from_the_session():
    serial = [(100, 100), (50, 150), (30, 180)]  # (tokens_read, tokens after) of each read answered 200
    assert serve_load.lost_updates(serial, 3, 180, True)["lost_reads"] == 0
    assert serve_load.lost_updates(serial, None, 180, True)["lost_reads"] == 0  # checked by a last read
    assert serve_load.lost_updates(serial[::-1], 3, 180, True)["lost_reads"] == 0  # answered in any order
    assert serve_load.lost_updates(serial, 3, 200, True)["lost_reads"] == 0  # + an unacknowledged read
    # two reads started from the same memory (100): one's save replaced the other's
    raced = [(100, 100), (50, 150), (30, 130)]
    found = serve_load.lost_updates(raced, 2, 130, True)
    assert found["overlapping_acks"] == 1 and found["lost_reads"] == 1 and found["lost_tokens"] == 50
    assert serve_load.lost_updates(raced, None, None, True)["lost_reads"] == 3  # unreadable: all lost
    assert serve_load.lost_updates(serial, 2, 150, True)["lost_reads"] == 1
    assert serve_load.lost_updates(serial, 3, 180, False)["lost_reads"] == 3  # not listed


def test_outcomes_and_targets_fail_when_they_should():
    Result = serve_load.Result
    assert Result("completion", "load", 0.0, status=200).outcome == "ok"
    assert Result("completion", "load", 0.0, status=429, retry_after="1").outcome == "rejected"
    assert Result("completion", "load", 0.0, status=503).outcome == "5xx"
    assert Result("completion", "load", 0.0, status=404).outcome == "4xx"
    assert Result("drop", "load", 0.0, error="APIConnectionError").outcome == "exception"
    assert Result("chat_stream", "load", 0.0, status=200, error="stream_error:server_error").outcome == "5xx"
    assert Result("chat_stream", "load", 0.0, status=200, error="stream_incomplete").outcome == "exception"
    assert serve_load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and serve_load.percentile([], 99) is None

    args = serve_load.parse_args(["--max-slowdown", "4", "--", "--dtype", "fp32"])
    assert args.serve_extra == ["--dtype", "fp32"] and args.max_input_tokens == 4096
    report = {
        "errors": {"5xx": 0, "exceptions": 0, "unexpected_4xx": 0, "malformed_not_4xx": 0},
        "clients_stuck": 0,
        "lost_updates": 0,
        "completion_16": {"slowdown_p99": 3.5},
        "memory": {"measured": True, "drift": -0.05},
        "alive_at_end": {"answering": True},
    }
    assert all(t["passed"] for t in serve_load.evaluate_targets(report, args).values())
    for broken, target in (
        ({"errors": {**report["errors"], "5xx": 1}}, "no_5xx"),
        ({"errors": {**report["errors"], "malformed_not_4xx": 2}}, "malformed_answered_4xx"),
        ({"clients_stuck": 1}, "no_exceptions"),
        ({"lost_updates": 1}, "no_lost_updates"),
        ({"completion_16": {"slowdown_p99": 4.5}}, "p99_16_tokens_vs_alone"),
        ({"completion_16": {"slowdown_p99": None}}, "p99_16_tokens_vs_alone"),
        ({"memory": {"measured": True, "drift": 0.2}}, "memory_flat"),
        ({"alive_at_end": {"answering": False}}, "answering_at_end"),
    ):
        targets = serve_load.evaluate_targets({**report, **broken}, args)
        assert [name for name, t in targets.items() if not t["passed"]] == [target], broken
    unmeasured = serve_load.evaluate_targets({**report, "memory": {"measured": False}}, args)
    assert unmeasured["memory_flat"]["passed"] is None
