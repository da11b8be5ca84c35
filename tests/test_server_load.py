"""`hmt serve` under load and attack: a client that leaves stops its work, the queue is bounded, every
bad value is a 4xx, errors inside streams are error events, sessions are checked and nothing leaks."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time

import pytest

from test_server import KEY, Server, call


@pytest.fixture(scope="module")
def busy_server(tiny_model_dir, tmp_path_factory):
    """Long answers allowed, a queue of 3."""
    sessions = tmp_path_factory.mktemp("sessions")
    running = Server(
        tiny_model_dir,
        sessions,
        **{"max-new-tokens": "4000", "max-queue": "3", "max-input-tokens": "20000", "max-request-mb": "0.5"},
    ).start()
    running.sessions = sessions
    yield running
    running.stop()


def open_stream(server, body: dict, first_event: bool = True) -> http.client.HTTPConnection:
    """A streamed completion (whose first event has arrived, if `first_event`); the caller closes it (a
    client leaving)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    assert response.status == 200
    if first_event:
        assert response.read(6) == b"data: "
    connection.response = response
    return connection


def timed(server, body) -> tuple[float, int, dict]:
    started = time.perf_counter()
    status, reply = call(server, "POST", "/v1/completions", body)
    return time.perf_counter() - started, status, reply


def test_a_client_that_leaves_stops_its_generation_and_nothing_is_kept(busy_server):
    long = {"prompt": "the memory reads", "max_tokens": 4000, "temperature": 0}
    alone, status, reply = timed(busy_server, long)
    assert status == 200 and reply["usage"]["completion_tokens"] > 500, reply  # long enough to matter
    short = {"prompt": "a", "max_tokens": 3}
    quick = min(timed(busy_server, short)[0] for _ in range(3))
    call(busy_server, "POST", "/v1/sessions/kept/read", {"text": "the model reads " * 10})
    before = call(busy_server, "POST", "/v1/sessions/kept/read", {"text": " x"})[1]["tokens"]
    stream = open_stream(busy_server, {**long, "session": "kept", "keep": True})
    stream.close()  # the client leaves after the first event
    waited, status, _ = timed(busy_server, short)
    assert status == 200
    assert waited < quick + alone / 4, (waited, quick, alone)  # not behind the abandoned 4,000 tokens
    after = call(busy_server, "POST", "/v1/sessions/kept/read", {"text": " x"})[1]
    assert after["tokens"] == before + after["tokens_read"]  # the abandoned answer was not kept


def test_a_full_queue_answers_429_with_retry_after(busy_server):
    long = {"prompt": "the memory reads", "max_tokens": 4000, "temperature": 0}
    streams = [open_stream(busy_server, long), *(open_stream(busy_server, long, False) for _ in range(2))]
    try:
        request = http.client.HTTPConnection("127.0.0.1", busy_server.port, timeout=60)
        request.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2}),
                        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
        response = response_of(request)
        assert response[0] == 429 and int(response[1]["retry-after"]) >= 1, response
        assert "busy" in response[2]["error"]["message"]
    finally:
        for stream in streams:
            stream.close()
    time.sleep(0.5)
    assert timed(busy_server, {"prompt": "a", "max_tokens": 2})[1] == 200


def test_concurrent_requests_answer_as_each_does_alone(busy_server):
    """The model decodes concurrent requests in one batch: each answer is what it is alone."""
    import threading

    requests = [
        ("/v1/completions", {"prompt": "the memory reads", "max_tokens": 12, "temperature": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "what is recalled?"}],
                                  "max_tokens": 9, "temperature": 0}),
        ("/v1/completions", {"prompt": "a segment of context", "max_tokens": 20, "temperature": 1.2,
                             "seed": 5}),
    ]  # fmt: skip
    alone = [call(busy_server, "POST", path, body)[1] for path, body in requests]
    together: list = [None] * len(requests)

    def ask(i):
        together[i] = call(busy_server, "POST", *requests[i])[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(alone, together, strict=True):
        assert one["choices"][0] | {"index": 0} == other["choices"][0] | {"index": 0}, (one, other)
        assert one["usage"] == other["usage"]


def response_of(connection) -> tuple[int, dict, dict]:
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams_in(busy_server):
    connection = http.client.HTTPConnection("127.0.0.1", busy_server.port, timeout=60)
    piece = b'"' + b"x" * 10_000 + b'"'

    def body():
        yield b'{"prompt": ["'
        for _ in range(600):  # 6 MB through a 0.5 MB limit, with no Content-Length
            yield piece

    connection.request("POST", "/v1/completions", body(), {"Authorization": f"Bearer {KEY}",
                       "Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
    try:
        status, _, reply = response_of(connection)
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed mid-upload
        status, reply = 413, {"error": {"message": "request body over"}}
    assert status == 413 and "request body over" in reply["error"]["message"]
    assert call(busy_server, "GET", "/v1/models")[0] == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "a", "n": 2}, "not supported by this server: n"),
        ({"prompt": "a", "logprobs": 3}, "not supported by this server: logprobs"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "stop": ""}, "stop"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": 7}, "prompt"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_values_are_4xx_streamed_or_not(busy_server, body, message, stream):
    status, reply = call(busy_server, "POST", "/v1/completions", {"stream": stream, **body})
    assert status == 400, reply
    assert message in reply["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": "a", "temperature": Infinity}', "temperature"),
        (b'{"prompt": "a", "temperature": NaN}', "temperature"),
        (b'{"prompt": "\\ud800 lone"}', "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
    ],
)
def test_values_json_cannot_hold_safely_are_4xx(busy_server, raw, message):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    status, reply = call(busy_server, "POST", path, raw=raw)
    assert status == 400, reply
    assert message in reply["error"]["message"]


def test_chat_content_parts_are_text_and_n_1_is_fine(busy_server):
    parts = [{"type": "text", "text": "what does "}, {"type": "text", "text": "memory recall?"}]
    status, reply = call(busy_server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": parts}], "max_tokens": 3, "n": 1, "logprobs": False,
    })  # fmt: skip
    assert status == 200, reply
    status, reply = call(busy_server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    })  # fmt: skip
    assert status == 400 and "only text content parts" in reply["error"]["message"]


def test_stream_options_include_usage(busy_server):
    from openai import OpenAI

    client = OpenAI(base_url=busy_server.url + "/v1", api_key=KEY)
    chunks = list(client.completions.create(model=None, prompt="the", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4


def test_errors_name_sessions_not_the_servers_folders(busy_server, tiny_model_dir):
    folder = str(busy_server.sessions)
    status, reply = call(busy_server, "POST", "/v1/completions", {"prompt": "a", "session": "missing"})
    assert status == 404 and folder not in json.dumps(reply)
    call(busy_server, "POST", "/v1/sessions/private/read", {"text": "secret things " * 5})
    status, reply = call(busy_server, "POST", "/v1/completions", {"prompt": "a", "session": "nope"})
    assert "private" not in json.dumps(reply)  # other sessions are not listed
    record = busy_server.sessions / "private.session.json"
    data = json.loads(record.read_text())
    data["model"]["adapter"] = "/somewhere/secret-adapter"
    record.write_text(json.dumps(data))
    status, reply = call(busy_server, "POST", "/v1/sessions/private/ask", {"question": "what?"})
    assert status == 409 and "another model (differs in adapter)" in reply["error"]["message"]
    assert "/somewhere" not in json.dumps(reply) and folder not in json.dumps(reply)
    data["model"] = "tiny"  # a damaged record
    record.write_text(json.dumps(data))
    for stream in (False, True):
        status, reply = call(busy_server, "POST", "/v1/completions", {"prompt": "a", "session": "private",
                                                                      "stream": stream})  # fmt: skip
        assert status == 409 and "damaged record" in reply["error"]["message"], reply


def test_a_session_of_another_dtype_answers_and_out_of_vocabulary_ids_are_refused(busy_server):
    from hmt.memory import MemoryState

    call(busy_server, "POST", "/v1/sessions/half/read", {"text": "the memory reads a segment " * 10})
    path = (
        busy_server.sessions
        / json.loads((busy_server.sessions / "half.session.json").read_text())["state_file"]
    )
    state = MemoryState.load(path)
    MemoryState(**{**state.tensors(), "memories": state.memories.half()}).save(path)
    body = {"prompt": "a", "session": "half", "max_tokens": 2}
    assert call(busy_server, "POST", "/v1/completions", body)[0] == 200
    streamed = call(busy_server, "POST", "/v1/completions", {**body, "stream": True})
    assert streamed[0] == 200 and "[DONE]" in streamed[1]
    ids = state.recent_ids.clone()
    ids[state.recent_mask] = 10**6
    MemoryState(**{**state.tensors(), "recent_ids": ids}).save(path)
    for stream in (False, True):
        status, reply = call(busy_server, "POST", "/v1/completions", {**body, "stream": stream})
        assert status == 409 and "vocabulary" in reply["error"]["message"], reply


def test_an_error_inside_a_stream_is_an_error_event_then_done():
    from hmt.server import APIError, Job, _Events, _stream

    async def run():
        raise RuntimeError("/secret/path exploded")

    async def collect(failing):
        events = _Events("text_completion", "cmpl-1", 0, "m", False)
        return [e async for e in _stream(failing, Job(), events, [])]

    events = asyncio.run(collect(run))
    assert json.loads(events[0].removeprefix("data: "))["error"]["type"] == "server_error"
    assert "/secret" not in events[0] and events[-1] == "data: [DONE]\n\n"

    async def refused():
        raise APIError(409, "session 'x' is busy")

    events = asyncio.run(collect(refused))
    assert "session 'x' is busy" in events[0] and events[-1] == "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", ""], "the API key is empty"),
        (["--host", "0.0.0.0"], "serves other machines: give --api-key"),
        (["--sessions", "/proc/nowhere"], "cannot write sessions into"),
    ],
)
def test_unsafe_or_unusable_serve_settings_are_one_line_before_the_model_loads(tiny_model_dir, args, message):
    command = [sys.executable, "-m", "hmt.cli", "serve", "--backbone", str(tiny_model_dir), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"})  # fmt: skip
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_the_key_is_compared_in_constant_time():
    import inspect

    from hmt import server

    assert "hmac.compare_digest" in inspect.getsource(server._Guard)


def test_a_long_read_lets_answers_through_between_its_chunks(busy_server):
    import threading

    finished = {}

    def read():
        finished["status"] = call(
            busy_server, "POST", "/v1/sessions/long/read", {"text": "the memory reads a segment " * 3000}
        )
        finished["read"] = time.perf_counter()

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)  # the read is under way (15,000 words, about 35 chunks)
    status, _ = call(busy_server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3})
    finished["answer"] = time.perf_counter()
    reader.join()
    assert status == 200 and finished["answer"] < finished["read"], finished
