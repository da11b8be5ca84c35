"""One door for settings: every command that loads a model takes `--set KEY=VALUE` for any HMTConfig setting,
and a setting added to HMTConfig reaches every command with no change to any command."""

from __future__ import annotations

import pytest

from conftest import run_cli

# Every command that loads a model, with the arguments it needs to get as far as loading it.
COMMANDS = {
    "eval": ["eval", "--data", "{corpus}", "--out", "{tmp}/eval"],
    "needle": ["needle", "--data", "{corpus}", "--split", "all", "--out", "{tmp}/needle"],
    "qa": ["qa", "--data", "{corpus}", "--out", "{tmp}/qa"],
    "voice": ["voice", "--data", "{corpus}", "--out", "{tmp}/voice"],
    "read": ["read", "{corpus}/doc00.txt", "--session", "s", "--sessions", "{tmp}/sessions"],
    "ask": ["ask", "s", "What?", "--sessions", "{tmp}/sessions"],
    "chat": ["chat", "--sessions", "{tmp}/sessions"],
    "generate": ["generate", "Once", "--sessions", "{tmp}/sessions"],
    "serve": ["serve", "--sessions", "{tmp}/sessions"],
}


class Reached(ValueError):
    """Raised by the stand-in loader: the command got as far as loading the model."""


@pytest.fixture
def loads(monkeypatch):
    """Replace the one loading function with one that records its settings and stops the command."""
    import hmt.loading

    seen: list[dict] = []

    def load_model(backbone=None, *, settings=None, **_):
        seen.append(dict(settings or {}))
        raise Reached("reached the loader")

    monkeypatch.setattr(hmt.loading, "load_model", load_model)
    return seen


@pytest.fixture
def any_session(monkeypatch):
    """Every session name is taken as existing (ask and generate check theirs before loading a model)."""
    import hmt.sessions

    monkeypatch.setattr(hmt.sessions.SessionStore, "info", lambda self, name: None)


def _args(command: str, corpus, tmp_path) -> list[str]:
    return [a.format(corpus=corpus, tmp=tmp_path) for a in COMMANDS[command]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_passes_set_and_the_named_flags_to_the_loader(command, loads, any_session, monkeypatch, capsys,
                                                                     corpus, tmp_path):  # fmt: skip
    args = [*_args(command, corpus, tmp_path), "--set", "sharpen_recall_after=null", "--set", "summary_length=5",
            "--cache-size", "7"]  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "reached the loader" in err, err
    assert {k: loads[-1][k] for k in ("sharpen_recall_after", "summary_length", "cache_size")} == {
        "sharpen_recall_after": None, "summary_length": 5, "cache_size": 7,
    }  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_new_reading_setting_reaches_every_command_without_touching_it(command, loads, any_session, monkeypatch,
                                                                          capsys, corpus, tmp_path):  # fmt: skip
    """Adding a setting is the config field, the step that uses it and its docs row: the commands' `--set`
    takes whatever HMTConfig's settable fields are."""
    import hmt.config

    fields = hmt.config.settable_fields()
    monkeypatch.setattr(hmt.config, "settable_fields", lambda: (*fields, "fake_setting"))
    code, _, err = run_cli(monkeypatch, capsys, *_args(command, corpus, tmp_path), "--set", "fake_setting=3")
    assert code == 1 and "reached the loader" in err, err
    assert loads[-1]["fake_setting"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "nonsense=2"], "nonsense: not a setting here; choose among segment_length"),
        (["--set", "cache_size=5", "--cache-size", "6"], "cache_size given both as a flag and with --set"),
        (["--set", "cache_size"], "--set takes KEY=VALUE"),
    ],
)
def test_a_setting_that_is_not_one_is_refused_before_anything_loads(extra, message, loads, monkeypatch, capsys,
                                                                     corpus, tmp_path):  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *_args("eval", corpus, tmp_path), *extra)
    assert code == 1 and message in " ".join(err.split()) and not loads


def test_the_lm_eval_model_takes_any_reading_setting_as_a_model_arg(loads, monkeypatch):
    pytest.importorskip("lm_eval")
    import hmt.config
    from hmt.harness import HMTLM

    fields = hmt.config.settable_fields()
    monkeypatch.setattr(hmt.config, "settable_fields", lambda: (*fields, "fake_setting"))
    with pytest.raises(Reached):
        HMTLM(adapter="none", cache_size="7", sharpen_recall_after="null", fake_setting="3")
    assert loads[-1] == {
        "cache_size": 7,
        "sharpen_recall_after": None,
        "fake_setting": 3,
        "recall_query": "causal",
    }
    with pytest.raises(ValueError, match="nonsense: not a setting here"):
        HMTLM(adapter="none", nonsense="2")


def test_bench_measures_with_the_settings_and_adapter_given(monkeypatch, capsys, tmp_path):
    import hmt.bench

    seen = []

    def run_bench(config, progress=None):
        seen.append(config)
        raise Reached("reached the bench")

    monkeypatch.setattr(hmt.bench, "run_bench", run_bench)
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--out", str(tmp_path / "b"), "--adapter", "none",
                           "--set", "summary_length=5", "--segment-length", "64")  # fmt: skip
    assert code == 1 and "reached the bench" in err
    assert seen[0].adapter == "none" and seen[0].settings == {"summary_length": 5, "segment_length": 64}


@pytest.mark.parametrize("command", [["ask", "nobody", "What?"], ["generate", "Once", "--session", "nobody"]])
def test_an_unknown_session_is_named_before_any_model_loads(command, loads, monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, *command, "--sessions", str(tmp_path))
    assert code == 1 and "no session 'nobody'" in err and not loads
