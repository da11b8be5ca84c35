"""`hmt train` end to end on a tiny local backbone: the two stages, resume, and refusals."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli


def train_args(tiny_model_dir, corpus, out, *extra: str) -> list[str]:
    return [
        "train", "--out", str(out), "--backbone", str(tiny_model_dir), "--data", str(corpus),
        "--validation-data", str(corpus), "--validation-tokens", "200", "--dtype", "fp32", "--device", "cpu",
        "--segment-length", "16", "--num-sensory", "4", "--cache-size", "8", "--batch-size", "2",
        "--log-every", "2", "--eval-every", "4", "--save-every", "2", *extra,
    ]  # fmt: skip


def test_two_stages_then_eval(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    one, two = tmp_path / "stage1", tmp_path / "stage2"
    code, _, err = run_cli(
        monkeypatch, capsys, *train_args(tiny_model_dir, corpus, one, "--stage", "1", "--max-steps", "4")
    )
    assert code == 0, err
    assert {"run.json", "train_log.jsonl", "checkpoints", "final", "summary.json"} <= {
        p.name for p in one.iterdir()
    }
    summary = json.loads((one / "summary.json").read_text())
    assert summary["train_config"]["mode"] == "rmt" and summary["train_config"]["unroll"] == "2"
    assert summary["validation"]["val_ppl"] > 1
    assert (one / "final" / "adapter_config.json").is_file()  # LoRA by default
    code, _, err = run_cli(
        monkeypatch, capsys, *train_args(tiny_model_dir, corpus, two, "--stage", "2", "--init-from", str(one),
                                         "--max-steps", "2", "--streaming"),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((two / "summary.json").read_text())
    assert summary["train_config"]["mode"] == "hmt" and summary["train_config"]["streaming"]
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", "--backbone", str(tiny_model_dir), "--adapter", str(two / "final"),
        "--data", str(corpus), "--split", "test", "--max-tokens", "100", "--modes", "hmt,backbone",
        "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert code == 0, err


def test_resume_and_refusals(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_model_dir, corpus, run, "--mode", "hmt", "--max-steps", "2")
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    log_before = (run / "train_log.jsonl").read_text()
    # Starting again in the same folder would overwrite it: refused.
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "already holds a run" in err and "--resume" in err
    # Resuming with other settings: refused, naming the difference.
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume", "--lr", "0.5")
    assert code == 1 and "lr: 0.0001 then, 0.5 now" in err
    # Resuming with more steps continues the log.
    longer = train_args(tiny_model_dir, corpus, run, "--mode", "hmt", "--max-steps", "4", "--resume")
    assert run_cli(monkeypatch, capsys, *longer)[0] == 0
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert (run / "train_log.jsonl").read_text().startswith(log_before) and steps[-1] == 4
    # Resuming a finished run is refused, and its summary and adapter are left as they were.
    summary = (run / "summary.json").read_text()
    adapter = (run / "final" / "hmt_adapter.safetensors").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *longer)
    assert code == 1 and "has finished its 4 steps" in err and "--max-steps" in err
    assert (run / "summary.json").read_text() == summary
    assert (run / "final" / "hmt_adapter.safetensors").read_bytes() == adapter
    # A run recorded before a setting existed ran with its default: resuming it is not refused for that.
    record = json.loads((run / "run.json").read_text())
    del record["settings"]["max_depth"], record["settings"]["train"]["bptt_depth"]
    (run / "run.json").write_text(json.dumps(record))
    five = train_args(tiny_model_dir, corpus, run, "--mode", "hmt", "--max-steps", "5", "--resume")
    code, _, err = run_cli(monkeypatch, capsys, *five)
    assert code == 0, err
    # A model setting recorded differently is a difference.
    record = json.loads((run / "run.json").read_text())
    record["settings"]["model"]["memory_layer"] = 1
    (run / "run.json").write_text(json.dumps(record))
    more = train_args(tiny_model_dir, corpus, run, "--mode", "hmt", "--max-steps", "5", "--resume")
    code, _, err = run_cli(monkeypatch, capsys, *more)
    assert code == 1 and "'memory_layer': 1" in err and "then" in err
    code, _, err = run_cli(monkeypatch, capsys, *train_args(tiny_model_dir, corpus, tmp_path / "none", "--mode",
                                                            "hmt", "--resume"))  # fmt: skip
    assert code == 1 and "nothing to resume" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "2"], "stage 2 starts from a stage-1 run"),
        (["--stage", "2", "--init-from", "/no/such/run"], "does not exist"),
        ([], "say what to train"),
        (["--mode", "hmt", "--max-train-tokens", "100", "--unroll", "8"], "fewer than one sample"),
        (["--mode", "hmt", "--finetune", "half"], "finetune must be one of"),
        (["--mode", "hmt", "--device", "foo"], "unknown device 'foo'"),
        (["--mode", "hmt", "--task", "trivia"], "unknown recall tasks ['trivia']"),
        (["--mode", "hmt", "--text-every", "2"], "used only with recall tasks"),
        (["--mode", "hmt", "--answer-in-memory", "1"], "used only with recall tasks"),
        (["--mode", "hmt", "--task", "passkey", "--streaming"], "without --streaming"),
        (["--mode", "hmt", "--lr", "nan", "--memory-lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--mode", "hmt", "--memory-lr", "0"], "--memory-lr must be a finite number > 0, got 0.0"),
        (["--mode", "hmt", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ],
)
def test_bad_requests(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path, extra, message):
    code, _, err = run_cli(monkeypatch, capsys, *train_args(tiny_model_dir, corpus, tmp_path / "r", *extra))
    assert code == 1 and message in err, err


def test_a_diverging_run_stops_in_one_line_and_keeps_its_adapter(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    run = tmp_path / "run"
    huge = ["--mode", "hmt", "--lr", "1e10", "--memory-lr", "1e10", "--warmup-steps", "0",
            "--save-every", "1"]  # fmt: skip
    code, _, err = run_cli(
        monkeypatch, capsys, *train_args(tiny_model_dir, corpus, run, *huge, "--max-steps", "1")
    )
    assert code == 0, err  # one step at that rate: large weights, still finite
    adapter = (run / "final" / "hmt_adapter.safetensors").read_bytes()
    more = train_args(tiny_model_dir, corpus, run, *huge, "--max-steps", "4", "--resume")
    code, _, err = run_cli(monkeypatch, capsys, *more)
    assert code == 1 and "error: training stopped at step 2: the " in err and "is nan" in err, err
    assert "try a lower --lr" in err and "Traceback" not in err
    assert (run / "final" / "hmt_adapter.safetensors").read_bytes() == adapter
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]


def test_stage2_refuses_an_unfinished_or_foreign_stage1(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    code, _, err = run_cli(monkeypatch, capsys, *train_args(tiny_model_dir, corpus, tmp_path / "r", "--stage", "2",
                                                            "--init-from", str(unfinished)))  # fmt: skip
    assert code == 1 and "has not finished" in err
    from conftest import tiny_hmt

    tiny_hmt("gpt2", segment_length=16, num_sensory=4).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(monkeypatch, capsys, *train_args(tiny_model_dir, corpus, tmp_path / "r2", "--stage", "2",
                                                            "--init-from", str(tmp_path / "gpt2")))  # fmt: skip
    assert code == 1 and "made for a gpt2 backbone" in err


def test_stage2_repeats_the_stage1_settings_and_refuses_parameter_changes(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    one = tmp_path / "stage1"
    args = train_args(tiny_model_dir, corpus, one, "--stage", "1", "--max-steps", "2", "--set", "attention_sink=true",
                      "--memory-tokens", "2")  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    same = train_args(tiny_model_dir, corpus, tmp_path / "two", "--stage", "2", "--init-from", str(one),
                      "--max-steps", "2", "--set", "attention_sink=true", "--memory-tokens", "2", "--cache-size", "6")  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *same)
    assert code == 0, err
    final = json.loads((tmp_path / "two" / "final" / "hmt_config.json").read_text())
    assert final["attention_sink"] is True and final["memory_tokens"] == 2
    assert final["cache_size"] == 6  # not tied to the parameters: stage 2 may read with another cache
    other = train_args(tiny_model_dir, corpus, tmp_path / "three", "--stage", "2", "--init-from", str(one),
                       "--max-steps", "2", "--set", "attention_sink=false")  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *other)
    assert code == 1 and "attention_sink" in err and "tied to the parameters" in err
    other = train_args(tiny_model_dir, corpus, tmp_path / "four", "--stage", "2", "--init-from", str(one),
                       "--max-steps", "2", "--memory-tokens", "3")  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *other)
    assert code == 1 and "memory_tokens" in err and "tied to the parameters" in err


def test_a_fully_fine_tuned_adapter_is_evaluated_on_its_own_backbone(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    run = tmp_path / "full"
    args = train_args(tiny_model_dir, corpus, run, "--mode", "hmt", "--max-steps", "2", "--finetune", "full",
                      "--lr", "0.05")  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert (run / "final" / "backbone" / "config.json").is_file()
    reports = {}
    for name, extra in {"tuned": (), "all-tuned": ("--lora-baselines",)}.items():
        code, _, err = run_cli(
            monkeypatch, capsys, "eval", "--backbone", str(tiny_model_dir), "--adapter", str(run / "final"),
            "--data", str(corpus), "--split", "test", "--max-tokens", "100", "--modes", "hmt,backbone",
            "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / name), *extra,
        )  # fmt: skip
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "results.json").read_text())
    weights = reports["tuned"]["config"]["weights"]
    assert weights == {"hmt": "the adapter's fine-tuned backbone", "backbone": "untouched backbone"}
    tuned, untouched = (
        reports["all-tuned"]["modes"]["backbone"]["ppl"],
        reports["tuned"]["modes"]["backbone"]["ppl"],
    )
    assert tuned != pytest.approx(untouched, rel=1e-4)  # the fine-tuned weights are really read


def test_train_on_a_recall_task_with_text_batches(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "task"
    extra = ("--mode", "hmt", "--task", "passkey", "--text-every", "2", "--unroll", "5:2,6", "--max-steps", "4",
             "--memory-tokens", "2", "--answer-in-memory", "0.5", "--recall-loss", "0.1")  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *train_args(tiny_model_dir, corpus, out, *extra))
    assert code == 0, err
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (
        settings["tasks"] == ["passkey"]
        and settings["text_every"] == 2
        and settings["answer_in_memory"] == 0.5
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert any("recall_supervision" in r for r in log)
    logged = [
        r for r in log if "answer_in_memory" in r
    ]  # each term apart, on the steps that had recall batches
    assert logged and all("answer_loss" in r and "recall_ce" in r for r in logged)
    assert (out / "final" / "hmt_config.json").exists()
    # The curriculum's first stage kept its adapter (checkpoints are pruned); the last stage is final/.
    assert [p.name for p in (out / "stages").iterdir()] == ["step-2-unroll-5"]
    assert (out / "stages" / "step-2-unroll-5" / "hmt_adapter.safetensors").exists()
