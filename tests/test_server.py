"""`hmt serve` started by the tests (tiny backbone), driven by plain HTTP and the real openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`hmt serve` in a subprocess; start() waits until it answers."""

    def __init__(self, model_dir, sessions, **options: str) -> None:
        self.port = free_port()
        settings = {"max-new-tokens": "64", "max-input-tokens": "3000", "max-request-mb": "0.05", **options}
        self.args = [
            sys.executable, "-m", "hmt.cli", "serve", "--backbone", str(model_dir), "--segment-length", "32",
            "--num-sensory", "4", "--port", str(self.port), "--sessions", str(sessions), "--api-key", KEY,
            "--dtype", "fp32", "--device", "cpu", *(f"--{k}={v}" for k, v in settings.items()),
            # the untrained model these tests were written on (before HMTConfig() became the shipped recipe)
            "--set", "memory_tokens=1", "--set", "recall_temperature=null", "--set", "sharpen_recall_after=null",
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(self.args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()}")
            try:
                call(self, "GET", "/v1/models")
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def call(server, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    running = Server(tiny_model_dir, tmp_path_factory.mktemp("sessions")).start()
    yield running
    running.stop()


def test_models_and_completions_over_plain_http(server):
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    name = models["data"][0]["id"]
    body = {"model": name, "prompt": "the memory", "max_tokens": 5, "temperature": 0}
    status, reply = call(server, "POST", "/v1/completions", body)
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < reply["usage"]["completion_tokens"] <= 5 and reply["usage"]["prompt_tokens"] > 0
    assert (
        call(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"] == reply["choices"][0]["text"]
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "key", "status", "message"),
    [
        ("POST", "/v1/completions", None, b"{not json", KEY, 400, "invalid request"),
        ("POST", "/v1/completions", {"max_tokens": 3}, None, KEY, 400, "prompt"),
        (
            "POST",
            "/v1/completions",
            {"prompt": "a", "max_tokens": 500},
            None,
            KEY,
            400,
            "over this server's limit",
        ),
        ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, None, KEY, 404, "no model 'gpt-9'"),
        ("POST", "/v1/completions", {"prompt": "a", "session": "nope"}, None, KEY, 404, "no session 'nope'"),
        ("POST", "/v1/completions", {"prompt": "a", "session": "../x"}, None, KEY, 400, "session names take"),
        ("POST", "/v1/completions", {"prompt": "the " * 3100}, None, KEY, 413, "over this server's limit"),
        ("POST", "/v1/completions", {"prompt": "x" * 60000}, None, KEY, 413, "request body over"),
        ("GET", "/v1/models", None, None, "wrong", 401, "API key"),
        ("GET", "/v1/models", None, None, None, 401, "API key"),
        ("DELETE", "/v1/sessions/nope", None, None, KEY, 404, "no session 'nope'"),
        ("GET", "/v1/nowhere", None, None, KEY, 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_lives_on(
    server, method, path, body, raw, key, status, message
):
    got, reply = call(server, method, path, body, key=key, raw=raw)
    assert got == status, reply
    assert message in reply["error"]["message"] and "Traceback" not in json.dumps(reply)
    assert call(server, "GET", "/v1/models")[0] == 200


def test_openai_client_completions_and_chat_streamed_or_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    name = client.models.list().data[0].id
    whole = client.completions.create(model=name, prompt="the segment", max_tokens=8, temperature=0)
    streamed = client.completions.create(
        model=name, prompt="the segment", max_tokens=8, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in streamed]
    assert "".join(pieces) == whole.choices[0].text
    messages = [{"role": "user", "content": "what does memory recall?"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_and_session_asks_answer_through_the_ask_path(server, tiny_model_dir):
    from transformers import AutoTokenizer

    from hmt.ask import ask_turn, encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # no chat template: plain Question turns

    def turn_tokens(messages) -> int:
        return encode(tokenizer, ask_turn(tokenizer, messages).text).numel()

    messages = [{"role": "user", "content": "what does memory recall?"}]
    status, reply = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 6})
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == turn_tokens(messages)
    assert "\nQuestion:" not in reply["choices"][0]["message"]["content"]
    assert (
        call(server, "POST", "/v1/sessions/gamma/read", {"text": "the model reads a context " * 5})[0] == 200
    )
    status, asked = call(
        server, "POST", "/v1/sessions/gamma/ask", {"question": "what reads?", "max_tokens": 4}
    )
    assert status == 200, asked
    assert asked["usage"]["prompt_tokens"] == turn_tokens("what reads?")


def test_stop_strings_end_the_text(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    free = (
        client.completions.create(prompt="long context", model=None, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    assert len(free) >= 4, free
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # a piece of the text it writes anyway
    cut = client.completions.create(
        prompt="long context", model=None, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == free.split(stop)[0] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        prompt="long context", model=None, max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sessions_read_ask_keep_delete_and_stay_apart(server):
    text_a, text_b = "the memory reads a segment " * 40, "context of the model and token " * 25
    results = {}

    def read(name, text):
        results[name] = call(server, "POST", f"/v1/sessions/{name}/read", {"text": text})

    threads = [threading.Thread(target=read, args=a) for a in (("alpha", text_a), ("beta", text_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["alpha"][0] == 200 and results["beta"][0] == 200, results
    assert results["alpha"][1]["tokens"] == results["alpha"][1]["tokens_read"]  # nothing of beta's
    assert results["beta"][1]["tokens"] == results["beta"][1]["tokens_read"]
    assert set(call(server, "GET", "/v1/sessions")[1]["data"]) >= {"alpha", "beta"}
    status, reply = call(
        server, "POST", "/v1/sessions/alpha/ask", {"question": "what reads?", "max_tokens": 4}
    )
    assert status == 200 and isinstance(reply["answer"], str)
    tokens = results["alpha"][1]["tokens"]
    assert call(server, "POST", "/v1/sessions/alpha/read", {"text": "more", "append": False})[0] == 409
    status, chat = call(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "and then?"}], "session": "alpha", "keep": True, "max_tokens": 3,
    })  # fmt: skip
    assert status == 200, chat
    grown = call(server, "POST", "/v1/sessions/alpha/read", {"text": " end"})[1]
    # the kept exchange is in the memory: the turn read twice (the ask path), then the answer
    usage = chat["usage"]
    assert (
        grown["tokens"]
        == tokens + 2 * usage["prompt_tokens"] + usage["completion_tokens"] + grown["tokens_read"]
    )
    assert call(server, "DELETE", "/v1/sessions/beta")[0] == 200
    assert call(server, "POST", "/v1/sessions/beta/ask", {"question": "?"})[0] == 404


def test_a_restart_keeps_sessions(tiny_model_dir, tmp_path):
    first = Server(tiny_model_dir, tmp_path).start()
    try:
        read = call(
            first, "POST", "/v1/sessions/book/read", {"text": "the model reads a long context " * 20}
        )[1]
        asked = call(first, "POST", "/v1/sessions/book/ask", {"question": "what?", "max_tokens": 4})[1]
    finally:
        first.stop()
    second = Server(tiny_model_dir, tmp_path).start()
    try:
        assert "book" in call(second, "GET", "/v1/sessions")[1]["data"]
        again = call(second, "POST", "/v1/sessions/book/ask", {"question": "what?", "max_tokens": 4})[1]
        assert again["answer"] == asked["answer"]  # greedy, from the same memory
        assert call(second, "POST", "/v1/sessions/book/read", {"text": " more"})[1]["tokens"] > read["tokens"]
    finally:
        second.stop()
