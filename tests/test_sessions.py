"""Sessions and the commands that use them: read, ask, chat, generate."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_ids, run_cli, tiny_hmt, word_text
from hmt.sessions import SessionInfo, SessionStore, check_name, model_identity


def identity(model, adapter=None):
    return model_identity(model, "tiny", adapter)


def test_store_saves_loads_and_refuses_another_model(tmp_path):
    model = tiny_hmt("llama")
    with torch.no_grad():
        state = model(random_ids(1, 21)).state
    store = SessionStore(tmp_path)
    store.save("book", state, SessionInfo(model=identity(model), sources=["book.txt"]))
    loaded, info = store.load("book", identity(model))
    assert torch.equal(loaded.pending_ids, state.pending_ids) and info.tokens == 21
    assert store.names() == ["book"]
    other = tiny_hmt("llama", segment_length=16)
    with pytest.raises(ValueError, match=r"session 'book' was made with another model .*hmt_config"):
        store.load("book", identity(other))
    with pytest.raises(FileNotFoundError, match=r"no session 'novel' .*\(sessions there: book\)"):
        store.load("novel", identity(model))
    store.delete("book")
    assert store.names() == [] and list(tmp_path.glob("*.safetensors")) == []


def saved_store(tmp_path, tokens=21):
    model = tiny_hmt("llama")
    with torch.no_grad():
        state = model(random_ids(1, tokens)).state
    store = SessionStore(tmp_path)
    store.save("book", state, SessionInfo(model=identity(model)))
    return model, state, store


def test_a_save_replaces_the_memory_file_and_a_crash_leaves_the_session_as_it_was(tmp_path, monkeypatch):
    model, state, store = saved_store(tmp_path)
    first = store.info("book").state_file
    with torch.no_grad():
        longer = model(random_ids(1, 40), state=state).state
    store.save("book", longer, SessionInfo(model=identity(model)))
    assert store.info("book").state_file != first and not (tmp_path / first).exists()
    assert store.load("book", identity(model))[1].tokens == 61

    def crash(*args, **kwargs):  # the process dies after the new memory file, before the record
        raise KeyboardInterrupt

    monkeypatch.setattr("hmt.sessions.write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("book", state, SessionInfo(model=identity(model)))
    monkeypatch.undo()
    loaded, info = store.load("book", identity(model))
    assert info.tokens == 61 and torch.equal(loaded.tokens, longer.tokens)  # not a step ahead
    (tmp_path / ".book.session.json.abc123xy.tmp").write_text("half a record")
    removed = store.clean()
    assert len(removed) == 2 and ".book.session.json.abc123xy.tmp" in removed
    assert sorted(p.name for p in tmp_path.glob("book*")) == sorted(["book.session.json", info.state_file])
    assert store.load("book", identity(model))[1].tokens == 61


def test_a_session_saved_before_versioned_files_still_loads(tmp_path):
    model, state, store = saved_store(tmp_path)
    record = json.loads((tmp_path / "book.session.json").read_text())
    (tmp_path / record.pop("state_file")).rename(tmp_path / "book.memory.safetensors")
    (tmp_path / "book.session.json").write_text(json.dumps(record))
    assert store.clean() == []
    assert torch.equal(store.load("book", identity(model))[0].tokens, state.tokens)


def test_clean_skips_a_session_another_process_is_changing(tmp_path):
    import subprocess
    import sys

    _, _, store = saved_store(tmp_path)
    (tmp_path / "book.memory-0123456789abcdef.safetensors").write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hmt.sessions import SessionStore; "
         f"lock = SessionStore({str(tmp_path)!r}).lock('book'); lock.acquire(); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.clean() == []
        lock = store.lock("book")
        with pytest.raises(TimeoutError):
            lock.acquire(timeout=0.2)
    finally:
        holder.communicate("")
    assert store.clean() == ["book.memory-0123456789abcdef.safetensors"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "tiny"}, "damaged record"),
        ({"sources": [1]}, "damaged record"),
        ({"tokens": "many"}, "damaged record"),
        ({"surprise": 1}, "damaged record"),
    ],
)
def test_damaged_records_are_refused_with_the_session_named(tmp_path, change, message):
    model, _, store = saved_store(tmp_path)
    record = json.loads((tmp_path / "book.session.json").read_text())
    (tmp_path / "book.session.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(ValueError, match=f"session 'book' has a {message}"):
        store.load("book", identity(model))


def test_memories_are_checked_against_the_model_and_take_its_dtype(tmp_path):
    from hmt.memory import MemoryState

    model, state, store = saved_store(tmp_path)
    path = tmp_path / store.info("book").state_file
    MemoryState(**{**state.tensors(), "memories": state.memories.half()}).save(path)
    loaded, _ = store.load("book", identity(model), model=model)
    assert loaded.memories.dtype == torch.float32
    bad_ids = state.recent_ids.clone()
    bad_ids[state.recent_mask] = model.vocab_size + 5
    MemoryState(**{**state.tensors(), "recent_ids": bad_ids}).save(path)
    with pytest.raises(ValueError, match=r"session 'book' holds an unusable memory: .*vocabulary"):
        store.load("book", identity(model), model=model)
    pending = torch.ones(1, 40, dtype=torch.long)
    MemoryState(**{**state.tensors(), "pending_ids": pending, "pending_mask": pending.bool()}).save(path)
    with pytest.raises(ValueError, match="unfinished segment"):
        store.load("book", identity(model), model=model)
    with pytest.raises(ValueError) as caught:
        path.write_bytes(b"not safetensors")
        store.load("book", identity(model), model=model)
    assert str(tmp_path) not in str(caught.value)


def test_appends_from_two_processes_at_once_are_all_kept(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    sessions = tmp_path / "sessions"
    texts = []
    for i in range(4):
        texts.append(tmp_path / f"part{i}.txt")
        texts[-1].write_text(word_text(i, 80))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hmt.cli", "read", "--session", "shared", "--append",
               *cli_model(tiny_model_dir, sessions)]  # fmt: skip
    runs = [subprocess.Popen([*command[:4], str(t), *command[4:]], env=env, stderr=subprocess.PIPE)
            for t in texts]  # fmt: skip
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()
    info = json.loads((sessions / "shared.session.json").read_text())
    assert sorted(info["sources"]) == sorted(str(t) for t in texts)


def test_adapter_identity_follows_the_files_not_the_path(tmp_path):
    model = tiny_hmt("llama")
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert (
        identity(model, tmp_path / "a")["adapter_sha256"] == identity(model, tmp_path / "b")["adapter_sha256"]
    )
    with torch.no_grad():
        model.memory.initial_memory.add_(1.0)
    model.save_pretrained(tmp_path / "b")
    assert (
        identity(model, tmp_path / "a")["adapter_sha256"] != identity(model, tmp_path / "b")["adapter_sha256"]
    )


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, "two words"])
def test_unsafe_session_names_are_refused(name):
    with pytest.raises(ValueError, match="session names take letters"):
        check_name(name)


def cli_model(tiny_model_dir, sessions):
    return ["--backbone", str(tiny_model_dir), "--segment-length", "32", "--num-sensory", "4",
            "--sessions", str(sessions), "--dtype", "fp32", "--device", "cpu"]  # fmt: skip


def test_read_then_ask_answers_without_changing_the_session(monkeypatch, capsys, tiny_model_dir, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(word_text(1, 300))
    sessions = tmp_path / "sessions"
    code, _, err = run_cli(
        monkeypatch, capsys, "read", str(book), "--session", "book", *cli_model(tiny_model_dir, sessions)
    )
    assert code == 0, err
    assert "tokens in" in err and "into session book" in err
    info = json.loads((sessions / "book.session.json").read_text())
    assert info["tokens"] > 300 and info["sources"] == [str(book)]
    memory_file = sessions / info["state_file"]  # the record names its memory file
    before = memory_file.read_bytes()
    code, out, err = run_cli(monkeypatch, capsys, "ask", "book", "what does memory recall?", "--max-new-tokens", "5",
                             *cli_model(tiny_model_dir, sessions))  # fmt: skip
    assert code == 0, err
    assert out.strip()  # some answer (an untrained tiny model: words, not the truth)
    assert memory_file.read_bytes() == before
    code, _, err = run_cli(monkeypatch, capsys, "ask", "book", "again?", "--max-new-tokens", "3", "--keep",
                           *cli_model(tiny_model_dir, sessions))  # fmt: skip
    assert code == 0, err
    assert json.loads((sessions / "book.session.json").read_text())["tokens"] > info["tokens"]


def test_read_refuses_to_replace_a_session_and_appends_when_asked(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    book = tmp_path / "book.txt"
    book.write_text(word_text(2, 100))
    sessions = tmp_path / "sessions"
    args = ["read", str(book), "--session", "book", *cli_model(tiny_model_dir, sessions)]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    tokens = json.loads((sessions / "book.session.json").read_text())["tokens"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "exists" in err and "--append" in err and "Traceback" not in err
    assert run_cli(monkeypatch, capsys, *args, "--append")[0] == 0
    info = json.loads((sessions / "book.session.json").read_text())
    assert info["tokens"] > 2 * tokens - 1 and info["sources"] == [str(book)] * 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--session", "../up"], "session names take"),
        (["--session", "ok", "--chunk", "0"], "--chunk must be >= 1"),
    ],
)
def test_read_bad_input_is_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, extra, message):
    book = tmp_path / "book.txt"
    book.write_text("some text")
    code, _, err = run_cli(
        monkeypatch, capsys, "read", str(book), *extra, *cli_model(tiny_model_dir, tmp_path)
    )
    assert code == 1 and message in err and "Traceback" not in err


def test_read_of_an_empty_or_missing_file_is_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(
        monkeypatch, capsys, "read", str(empty), "--session", "e", *cli_model(tiny_model_dir, tmp_path)
    )
    assert code == 1 and "holds no text" in err
    code, _, err = run_cli(monkeypatch, capsys, "read", str(tmp_path / "nope.txt"), "--session", "e",
                           *cli_model(tiny_model_dir, tmp_path))  # fmt: skip
    assert code == 1 and "is not a file" in err


def test_ask_refuses_a_session_made_by_another_model(monkeypatch, capsys, tiny_model_dir, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(word_text(3, 80))
    sessions = tmp_path / "sessions"
    assert (
        run_cli(
            monkeypatch, capsys, "read", str(book), "--session", "b", *cli_model(tiny_model_dir, sessions)
        )[0]
        == 0
    )
    args = cli_model(tiny_model_dir, sessions)
    args[args.index("--segment-length") + 1] = "16"
    code, _, err = run_cli(monkeypatch, capsys, "ask", "b", "why?", *args)
    assert code == 1 and "made with another model" in err and "Traceback" not in err


def test_chat_remembers_across_turns_and_runs(monkeypatch, capsys, tiny_model_dir, tmp_path):
    import io
    import sys

    sessions = tmp_path / "sessions"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello memory\nand the segment?\n/exit\n"))
    code, out, err = run_cli(
        monkeypatch, capsys, "chat", "talk", "--max-new-tokens", "4", *cli_model(tiny_model_dir, sessions)
    )
    assert code == 0, err
    assert out.count("hmt> ") == 2
    first = json.loads((sessions / "talk.session.json").read_text())["tokens"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("once more\n"))
    code, out, err = run_cli(
        monkeypatch, capsys, "chat", "talk", "--max-new-tokens", "4", *cli_model(tiny_model_dir, sessions)
    )
    assert code == 0, err
    assert f"{first:,} tokens remembered" in out
    assert json.loads((sessions / "talk.session.json").read_text())["tokens"] > first


def test_generate_continues_a_prompt_greedily(monkeypatch, capsys, tiny_model_dir, tmp_path):
    args = ["generate", "the memory", "--max-new-tokens", "6", *cli_model(tiny_model_dir, tmp_path)]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert out.startswith("the memory") and len(out.strip()) > len("the memory")
    assert run_cli(monkeypatch, capsys, *args)[1] == out  # greedy: the same text again
    code, _, err = run_cli(monkeypatch, capsys, *args, "--keep")
    assert code == 1 and "--keep saves into a session" in err
