"""Load test for `hmt serve`: concurrent clients for a while, then the server's targets checked.

Starts `hmt serve` itself (a temporary sessions folder, a random API key, a free port) or drives a
running server (`--url`, `--api-key`). Before the load: a 16-token completion timed alone (the median
of 5, after 2 warm-ups), one read into every session the run uses, and one of every malformed request.
Then `--clients` threads, each with its own `openai` client (no retries), loop for `--duration` seconds
over a weighted mix (`--mix`):

    completion         unstreamed completion, 16 new tokens, temperature 0 (the request timed alone)
    completion_stream  the same, streamed
    chat / chat_stream chat completions, 16 new tokens, temperature 0
    read / read_shared POST /v1/sessions/NAME/read, 300-1000 words appended to the client's own
                       session / to the one session every client shares
    ask                POST /v1/sessions/NAME/ask on the client's own session or the shared one
    drop               a streamed completion of --drop-max-tokens, closed after --drop-after chunks
    malformed          bad JSON, wrong types, unknown session or model, n=2, logprobs, echo, best_of,
                       input over --max-input-tokens, a wrong key: each must be answered 4xx

It reports requests/s, p50/p99 latency per kind, status codes (429 is "rejected": neither a success nor
a server error), exceptions, the server process's RSS (sampled every second), lost session updates
(reads acknowledged with 200 but missing from the session at the end: its `sources` and `tokens` on disk
when the sessions folder is known, else a last small read's `tokens`), and whether the server still
answers at the end. Prints tables, writes JSON (`--out`), and exits 1 if a target fails:

    no 5xx (nor an error event inside a stream)  --max-5xx 0
    no exception (connection error, timeout)     --max-exceptions 0
    no 4xx other than 429 to a valid request     --max-unexpected-4xx 0
    no lost session update                       --max-lost-updates 0
    p99 of the 16-token completion under load    --max-slowdown 3 (times its time alone)
    memory flat after the warm-up                --max-rss-drift 0.10 (|end / after warm-up - 1|)
    every malformed request answered 4xx         --max-malformed-not-4xx 0
    the server still answering at the end

Examples:

    python -m benchmarks.serve_load --out serve-load.json                       # default backbone
    python -m benchmarks.serve_load --backbone path/to/model --clients 4 --duration 60 -- --dtype fp32
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --api-key secret --server-pid 1234

Arguments after `--` go to `hmt serve` unchanged. Exit status: 0 all targets met, 1 a target failed,
3 the run could not be made (the server did not start or answer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
from rich.console import Console
from rich.table import Table

DEFAULT_MIX = {
    "completion": 4,
    "completion_stream": 2,
    "chat": 2,
    "chat_stream": 1,
    "read": 2,
    "read_shared": 2,
    "ask": 2,
    "drop": 1,
    "malformed": 2,
}
STREAMED = ("completion_stream", "chat_stream", "drop")
NEW_TOKENS = 16
TIMED_PROMPT = "The memory of a long context is read one segment at a time, and"
PROMPTS = (
    TIMED_PROMPT,
    "Once upon a time, in a library that never closed,",
    "The report on the river crossing said that",
    "A segment of text is summarised into a memory token so that",
)
QUESTIONS = (
    "What was read into this memory?",
    "Who wrote the letter, and when?",
    "Summarise the document in one sentence.",
    "What happened at the river crossing?",
)
# fmt: off
WORDS = (
    "the", "memory", "segment", "recall", "token", "long", "context", "model", "reads", "a", "of", "and",
    "river", "crossing", "letter", "library", "morning", "wrote", "report", "summary", "city", "north",
    "south", "before", "after", "because", "while", "people", "water", "bridge", "evening", "night",
    "day", "year", "king", "queen", "garden", "window", "small", "large", "old", "new", "first", "last",
    "found", "lost", "kept",
)
# fmt: on
MALFORMED = (
    "bad_json",
    "wrong_types",
    "chat_wrong_types",
    "read_wrong_types",
    "unknown_session",
    "unknown_session_completion",
    "unknown_model",
    "n_2",
    "chat_n_2",
    "logprobs",
    "echo",
    "best_of",
    "overlong",
    "bad_key",
)


# ---- options -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Arguments after `--` are passed to `hmt serve` unchanged.",
    )
    target = parser.add_argument_group("the server")
    target.add_argument("--url", help="drive this running server (http://HOST:PORT) instead of starting one")
    target.add_argument(
        "--api-key", default=os.environ.get("HMT_API_KEY"), help="its key (default $HMT_API_KEY)"
    )
    target.add_argument("--server-pid", type=int, help="with --url: the process whose RSS to sample")
    target.add_argument(
        "--sessions-dir",
        type=Path,
        help="with --url: the server's sessions folder, to read sessions' records",
    )
    target.add_argument("--backbone", help="started server: backbone path or name (default: hmt's default)")
    target.add_argument("--adapter", help="started server: an HMT adapter folder")
    target.add_argument("--segment-length", type=int, help="started server: --segment-length")
    target.add_argument("--num-sensory", type=int, help="started server: --num-sensory")
    target.add_argument(
        "--max-input-tokens",
        type=int,
        help="the server's input limit; a started server gets it (default 4096), a --url server is assumed "
        "to have hmt's default (131072); the over-long request sends more",
    )
    target.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    load = parser.add_argument_group("the load")
    load.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    load.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    load.add_argument(
        "--warmup", type=float, default=30.0, help="seconds before the RSS baseline is taken (default 30)"
    )
    load.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        help="weights of the request kinds, KIND=WEIGHT,... (default %(default)s)",
    )
    load.add_argument(
        "--read-tokens",
        type=int,
        nargs=2,
        default=(300, 1000),
        metavar=("MIN", "MAX"),
        help="tokens per read (words sized by a first read's tokens per word; default 300 1000)",
    )
    load.add_argument("--drop-max-tokens", type=int, default=512, help="max_tokens of a dropped stream")
    load.add_argument("--drop-after", type=int, default=2, help="chunks read before a stream is dropped")
    load.add_argument("--alone-runs", type=int, default=5, help="timed 16-token completions before the load")
    load.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    load.add_argument("--seed", type=int, default=0, help="seed of the clients' choices and texts")
    load.add_argument(
        "--keep-sessions", action="store_true", help="with --url: leave the run's sessions on the server"
    )
    targets = parser.add_argument_group("targets (a failed one exits 1)")
    targets.add_argument("--max-5xx", type=int, default=0)
    targets.add_argument("--max-exceptions", type=int, default=0)
    targets.add_argument("--max-unexpected-4xx", type=int, default=0)
    targets.add_argument("--max-lost-updates", type=int, default=0)
    targets.add_argument(
        "--max-slowdown", type=float, default=3.0, help="p99 of the 16-token completion under load / alone"
    )
    targets.add_argument("--max-rss-drift", type=float, default=0.10, help="|RSS end / after warm-up - 1|")
    targets.add_argument("--max-malformed-not-4xx", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    args.serve_extra = serve_extra
    args.mix = parse_mix(parser, args.mix)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.alone_runs < 1:
        parser.error("--clients and --alone-runs must be at least 1, --duration positive, --warmup >= 0")
    if not 1 <= args.read_tokens[0] <= args.read_tokens[1]:
        parser.error("--read-tokens MIN MAX: 1 <= MIN <= MAX")
    if args.url is not None:
        args.url = args.url.rstrip("/").removesuffix("/v1")
        started_only = ("backbone", "adapter", "segment_length", "num_sensory")
        if any(getattr(args, name) is not None for name in started_only) or serve_extra:
            parser.error(
                "--backbone, --adapter, --segment-length, --num-sensory and `-- ...` start a server: "
                "not with --url"
            )
    elif args.server_pid is not None or args.sessions_dir is not None:
        parser.error("--server-pid and --sessions-dir go with --url")
    if args.max_input_tokens is None:
        args.max_input_tokens = 131072 if args.url else 4096
    return args


def parse_mix(parser: argparse.ArgumentParser, text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in DEFAULT_MIX:
            parser.error(f"--mix: unknown kind {name!r} (kinds: {', '.join(DEFAULT_MIX)})")
        try:
            mix[name] = float(weight)
        except ValueError:
            parser.error(f"--mix: {part!r} is not KIND=WEIGHT")
        if mix[name] < 0:
            parser.error(f"--mix: {name} has a negative weight")
    if not any(mix.values()):
        parser.error("--mix: give some kind a positive weight")
    return {k: v for k, v in mix.items() if v > 0}


# ---- the server ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    key: str | None
    process: subprocess.Popen | None = None
    sessions_dir: Path | None = None
    log: Path | None = None
    pid: int | None = None
    model: str = ""
    command: list[str] | None = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self.process is None or self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, workdir: Path) -> Server:
    port, key = free_port(), secrets.token_urlsafe(16)
    sessions = workdir / "sessions"
    command = [
        sys.executable, "-m", "hmt.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--sessions",
        str(sessions), "--api-key", key, "--max-input-tokens", str(args.max_input_tokens),
    ]  # fmt: skip
    for option, value in (
        ("--backbone", args.backbone),
        ("--adapter", args.adapter),
        ("--segment-length", args.segment_length),
        ("--num-sensory", args.num_sensory),
    ):
        if value is not None:
            command += [option, str(value)]
    command += args.serve_extra
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", key, process, sessions, log, process.pid, command=command)


def wait_until_answering(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"the server exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            reply = http(server, "GET", "/v1/models", timeout=10)
            if reply.status == 200:
                server.model = reply.data["data"][0]["id"]
                return
            last = f"GET /v1/models: {reply.status} {reply.data}"
            if reply.status in (401, 403):
                break
        except OSError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer in {timeout:.0f} s ({last})\n{server.log_tail()}")


def find_pid_listening(url: str) -> int | None:
    """The local process listening on `url`'s port, if psutil may see it."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "0.0.0.0", "::1"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError, OSError):
        return None
    return None


# ---- plain HTTP (session endpoints, malformed requests) ------------------------------------------


@dataclass
class Reply:
    status: int
    data: Any
    retry_after: str | None = None


def http(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    key: str | bool | None = True,
    timeout: float = 120.0,
) -> Reply:
    """One request by urllib (a new connection each); connection errors and timeouts raise OSError."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = server.key if key is True else key
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, text = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, text = err.code, err.headers, err.read()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text.decode(errors="replace")
    return Reply(status, parsed, headers.get("Retry-After") if headers is not None else None)


# ---- results -------------------------------------------------------------------------------------


@dataclass
class Result:
    """One request: what was sent, how it ended."""

    kind: str
    phase: str  # "alone", "setup", "load", "end"
    started: float  # seconds since the load started (negative before it)
    latency: float = 0.0
    status: int | None = None  # None: no HTTP status (an exception before one came)
    ok: bool = False
    error: str | None = None  # an exception's type, "stream_error:TYPE" or "stream_incomplete"
    message: str | None = None
    retry_after: str | None = None
    ttft: float | None = None  # streams: seconds to the first text
    sub: str | None = None  # malformed: which
    session: str | None = None
    tokens_read: int | None = None  # reads: acknowledged tokens_read
    tokens: int | None = None  # reads: the session's tokens after it; completions: completion_tokens
    chunks: int | None = None

    @property
    def outcome(self) -> str:
        """ok | rejected | 4xx | 5xx | exception (for malformed requests 4xx is the right answer)."""
        if self.status == 429:
            return "rejected"
        if self.error is not None and self.error.startswith("stream_error:"):
            kind = self.error.split(":", 1)[1]
            if "rate_limit" in kind or "overloaded" in kind:
                return "rejected"
            return "4xx" if "invalid_request" in kind else "5xx"
        if self.status is None or self.error is not None:
            return "exception"
        if self.status >= 500:
            return "5xx"
        if self.status >= 400:
            return "4xx"
        return "ok"


class Load:
    """The clients' shared setting; each client thread appends its Results."""

    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args, self.server = args, server
        self.run_id = secrets.token_hex(3)
        self.shared = f"load-{self.run_id}-shared"
        self.own = [f"load-{self.run_id}-c{i}" for i in range(args.clients)]
        self.missing = f"load-{self.run_id}-missing"
        self.scratch = f"load-{self.run_id}-scratch"
        self.results: list[Result] = []
        self.tokens_per_word: float | None = None  # measured by the first read
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, result: Result) -> Result:
        with self.lock:
            self.results.append(result)
        return result

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.server.url + "/v1",
            api_key=self.server.key or "none",
            max_retries=0,
            timeout=self.args.request_timeout,
        )

    # -- one request of each kind --

    def run(
        self,
        kind: str,
        client: openai.OpenAI,
        index: int,
        rng: random.Random,
        phase: str,
        sub: str | None = None,
    ) -> Result:
        result = Result(kind=kind, phase=phase, started=self.now(), sub=sub)
        start = time.monotonic()
        try:
            getattr(self, f"_{kind}")(result, client, index, rng)
        except openai.APIStatusError as err:
            result.status, result.message = err.status_code, _message(err.body) or str(err)
            result.retry_after = err.response.headers.get("retry-after")
        except openai.APIConnectionError as err:  # timeouts too
            result.error, result.message = type(err).__name__, _cause(err)
        except openai.APIError as err:  # an error event inside a stream
            body = err.body if isinstance(err.body, dict) else {}
            result.error = f"stream_error:{body.get('type') or body.get('code') or 'unknown'}"
            result.message = err.message
        except OSError as err:
            result.error, result.message = type(err).__name__, str(err)
        except Exception as err:  # a bug here or an answer of an unexpected shape: counted, not hidden
            result.error, result.message = type(err).__name__, str(err)
        result.latency = time.monotonic() - start
        if result.status is None and result.error is None:
            result.status = 200
        result.ok = result.outcome == ("4xx" if kind == "malformed" else "ok")
        return self.add(result)

    def _completion(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        reply = client.completions.create(
            model=self.server.model, prompt=TIMED_PROMPT, max_tokens=NEW_TOKENS, temperature=0
        )
        result.status, result.tokens = 200, reply.usage.completion_tokens if reply.usage else None

    def _completion_stream(
        self, result: Result, client: openai.OpenAI, index: int, rng: random.Random
    ) -> None:
        stream = client.completions.create(
            model=self.server.model,
            prompt=rng.choice(PROMPTS),
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
        )
        self._consume(result, stream, lambda c: c.choices[0].text if c.choices else "")

    def _chat(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        reply = client.chat.completions.create(
            model=self.server.model,
            messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
            max_tokens=NEW_TOKENS,
            temperature=0,
        )
        result.status, result.tokens = 200, reply.usage.completion_tokens if reply.usage else None

    def _chat_stream(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        stream = client.chat.completions.create(
            model=self.server.model,
            messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
        )
        self._consume(result, stream, lambda c: (c.choices[0].delta.content or "") if c.choices else "")

    def _consume(self, result: Result, stream: Any, text_of) -> None:
        start, chunks, finished = time.monotonic(), 0, False
        result.status = 200
        with stream:
            for chunk in stream:
                chunks += 1
                if result.ttft is None and text_of(chunk):
                    result.ttft = time.monotonic() - start
                finished = finished or any(c.finish_reason for c in chunk.choices)
        result.chunks = chunks
        if not finished:
            result.error, result.message = (
                "stream_incomplete",
                f"ended after {chunks} chunks, no finish_reason",
            )

    def _drop(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        start = time.monotonic()
        stream = client.completions.create(
            model=self.server.model,
            prompt=rng.choice(PROMPTS),
            max_tokens=self.args.drop_max_tokens,
            temperature=0,
            stream=True,
        )
        result.status, chunks = 200, 0
        try:
            for _chunk in stream:
                chunks += 1
                if result.ttft is None:
                    result.ttft = time.monotonic() - start
                if chunks >= self.args.drop_after:
                    break
        finally:
            stream.close()  # the connection goes: the server should stop generating
        result.chunks = chunks

    def _read(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        self.read_into(result, self.own[index], rng)

    def _calibrate(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        self.read_into(result, self.own[index], rng, words=100)

    def _read_shared(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        self.read_into(result, self.shared, rng)

    def read_into(self, result: Result, name: str, rng: random.Random, words: int | None = None) -> None:
        """Append words to session `name`: about --read-tokens tokens once a first read has measured the
        tokenizer's tokens per word (`words`: that many)."""
        calibrating = words is not None
        if words is None:
            words = max(1, round(rng.randint(*self.args.read_tokens) / (self.tokens_per_word or 1.0)))
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        result.session = name
        reply = http(
            self.server,
            "POST",
            f"/v1/sessions/{name}/read",
            {"text": text, "append": True},
            timeout=self.args.request_timeout,
        )
        result.status, result.retry_after = reply.status, reply.retry_after
        if reply.status == 200:
            result.tokens_read, result.tokens = int(reply.data["tokens_read"]), int(reply.data["tokens"])
            if calibrating:
                self.tokens_per_word = result.tokens_read / words
        else:
            result.message = _message(reply.data)

    def _ask(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        name = self.own[index] if rng.random() < 0.5 else self.shared
        body = {"question": rng.choice(QUESTIONS), "max_tokens": NEW_TOKENS, "temperature": 0}
        reply = http(self.server, "POST", f"/v1/sessions/{name}/ask", body, timeout=self.args.request_timeout)
        result.session, result.status, result.retry_after = name, reply.status, reply.retry_after
        if reply.status == 200:
            if not isinstance(reply.data.get("answer"), str):
                raise ValueError(f"ask answered without an answer: {reply.data}")
        else:
            result.message = _message(reply.data)

    def _malformed(self, result: Result, client: openai.OpenAI, index: int, rng: random.Random) -> None:
        sub = result.sub or rng.choice(MALFORMED)
        result.sub = sub
        method, path, body, raw, key = self.malformed_request(sub)
        reply = http(self.server, method, path, body, raw=raw, key=key, timeout=self.args.request_timeout)
        result.status, result.retry_after = reply.status, reply.retry_after
        result.message = _message(reply.data) if reply.status >= 400 else None

    def malformed_request(self, sub: str) -> tuple[str, str, Any, bytes | None, str | bool | None]:
        """(method, path, JSON body, raw body, key: True for the server's) of one malformed request; each
        must be answered 4xx."""
        good = {
            "model": self.server.model,
            "prompt": TIMED_PROMPT,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
        }
        chat = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": NEW_TOKENS}
        completions, chats = "/v1/completions", "/v1/chat/completions"
        if sub == "bad_json":
            return "POST", completions, None, b'{"prompt": "the memory", "max_tokens": 16,', True
        if sub == "bad_key":
            return "GET", "/v1/models", None, None, "wrong-" + secrets.token_hex(4)
        if sub == "overlong":  # every word is at least one token
            words = int(self.args.max_input_tokens * 1.25) + 64
            return "POST", completions, {**good, "prompt": " the" * words}, None, True
        method_path_body = {
            "wrong_types": (completions, {"prompt": 12, "max_tokens": "sixteen"}),
            "chat_wrong_types": (chats, {"messages": "hello", "max_tokens": 16}),
            "read_wrong_types": (f"/v1/sessions/{self.scratch}/read", {"text": ["a", "b"]}),
            "unknown_session": (f"/v1/sessions/{self.missing}/ask", {"question": "what?"}),
            "unknown_session_completion": (completions, {**good, "session": self.missing}),
            "unknown_model": (completions, {**good, "model": "no-such-model"}),
            "n_2": (completions, {**good, "n": 2}),
            "chat_n_2": (chats, {**chat, "n": 2}),
            "logprobs": (completions, {**good, "logprobs": 2}),
            "echo": (completions, {**good, "echo": True}),
            "best_of": (completions, {**good, "best_of": 2}),
        }
        path, body = method_path_body[sub]
        return "POST", path, body, None, True


def _message(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return None if body is None else str(body)[:300]


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__
    return f"{err}: {type(cause).__name__}: {cause}" if cause is not None else str(err)


# ---- the run -------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """The RSS of a process and its children, every `interval` seconds: [(seconds since start, bytes)]."""

    def __init__(self, pid: int, load: Load, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.load, self.interval = pid, load, interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.error: str | None = None

    def sample(self) -> None:
        try:
            process = psutil.Process(self.pid)
            rss = process.memory_info().rss
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.samples.append((self.load.now(), rss))
        except psutil.Error as err:
            self.error = f"{type(err).__name__}: {err}"

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
        self.sample()


def client_loop(load: Load, index: int, deadline: float) -> None:
    rng = random.Random(load.args.seed * 100_003 + index)
    client = load.client()
    kinds, weights = list(load.args.mix), list(load.args.mix.values())
    try:
        while time.monotonic() < deadline:
            load.run(rng.choices(kinds, weights)[0], client, index, rng, "load")
    finally:
        client.close()


def prepare(load: Load, console: Console) -> dict[str, Any]:
    """Before the load: the 16-token completion alone, the sessions made, every malformed request once."""
    client, rng = load.client(), random.Random(load.args.seed)
    try:
        for _ in range(2):  # warm-ups, not timed
            load.run("completion", client, 0, rng, "warmup")
        alone = [load.run("completion", client, 0, rng, "alone") for _ in range(load.args.alone_runs)]
        load.run("calibrate", client, 0, rng, "setup")  # tokens per word: sizes the reads
        for index in range(load.args.clients):
            load.run("read", client, index, rng, "setup")
        load.run("read_shared", client, 0, rng, "setup")
        for sub in MALFORMED:  # the sweep: every malformed request once, outside the load
            load.run("malformed", client, 0, rng, "setup", sub=sub)
    finally:
        client.close()
    console.print(f"tokens per word of this tokenizer: {load.tokens_per_word}")
    for result in load.results:
        if result.phase == "setup" and result.kind == "malformed":
            continue
        if result.phase in ("warmup", "alone", "setup") and not result.ok:
            console.print(
                f"[yellow]before the load: {result.kind} answered {result.status} {result.error or ''} "
                f"{result.message or ''}"
            )
    times = [r.latency for r in alone if r.ok]
    return {
        "runs": len(alone),
        "ok": len(times),
        "samples_s": [round(t, 4) for t in times],
        "median_s": _median(times),
        "completion_tokens": alone[-1].tokens if alone and alone[-1].ok else None,
    }


def run_load(args: argparse.Namespace, server: Server, console: Console) -> dict[str, Any]:
    load = Load(args, server)
    console.print(
        f"[bold]{server.model}[/] at {server.url}: timing the 16-token completion alone, "
        f"making {args.clients + 1} sessions"
    )
    alone = prepare(load, console)
    pid = server.pid or (find_pid_listening(server.url) if args.url else None)
    warmup = args.warmup if args.warmup < args.duration else args.duration / 2
    console.print(
        f"load: {args.clients} clients for {args.duration:.0f} s (RSS baseline after {warmup:.0f} s)"
    )
    shift = time.monotonic() - load.t0
    load.t0 += shift
    for result in load.results:  # requests before the load started at negative times
        result.started -= shift
    sampler = RssSampler(pid, load) if pid is not None else None
    if sampler is not None:
        sampler.start()
    deadline = load.t0 + args.duration
    threads = [
        threading.Thread(target=client_loop, args=(load, i, deadline), daemon=True, name=f"client-{i}")
        for i in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + args.request_timeout + 30)
    stuck = sum(thread.is_alive() for thread in threads)
    elapsed = load.now()
    if sampler is not None:
        sampler.stop()
    alive = check_alive(load)
    sessions = check_sessions(load)
    return build_report(args, server, load, alone, elapsed, stuck, warmup, pid, sampler, alive, sessions)


def check_alive(load: Load) -> dict[str, Any]:
    """Does the server still answer: GET /v1/models, then the 16-token completion (timed)."""
    report: dict[str, Any] = {"process_running": load.server.running()}
    try:
        report["models_status"] = http(load.server, "GET", "/v1/models", timeout=30).status
    except OSError as err:
        report["models_status"], report["models_error"] = None, f"{type(err).__name__}: {err}"
    client = load.client()
    try:
        result = load.run("completion", client, 0, random.Random(0), "end")
    finally:
        client.close()
    report.update(
        completion_status=result.status, completion_s=round(result.latency, 4), completion_error=result.error
    )
    report["answering"] = bool(report["process_running"] and report["models_status"] == 200 and result.ok)
    return report


READ_KINDS = ("read", "read_shared", "calibrate")


def check_sessions(load: Load) -> dict[str, Any]:
    """Acknowledged reads against what each session holds at the end: lost updates."""
    names = [*load.own, load.shared]
    reads = [r for r in load.results if r.kind in READ_KINDS]
    failed = Counter(r.session for r in reads if not r.ok)
    try:
        reply = http(load.server, "GET", "/v1/sessions", timeout=30)
        listed = set(reply.data.get("data", [])) if reply.status == 200 else None
    except OSError:
        listed = None
    folder = load.server.sessions_dir
    sessions: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {"unacknowledged_reads": failed.get(name, 0), "source": None}
        recorded_reads = recorded_tokens = None
        record = folder / f"{name}.session.json" if folder is not None else None
        if record is not None:
            entry["source"] = "disk"
            if record.exists():
                info = json.loads(record.read_text())
                recorded_tokens, recorded_reads = int(info.get("tokens", 0)), len(info.get("sources", []))
            else:
                recorded_tokens, recorded_reads = 0, 0
        else:  # a last small read: its `tokens` less its `tokens_read` is what the session held
            try:
                probe = http(load.server, "POST", f"/v1/sessions/{name}/read", {"text": " end.", "append": True},
                             timeout=load.args.request_timeout)  # fmt: skip
                if probe.status == 200:
                    entry["source"] = "probe"
                    recorded_tokens = int(probe.data["tokens"]) - int(probe.data["tokens_read"])
                else:
                    entry["probe_error"] = f"{probe.status}: {_message(probe.data)}"
            except OSError as err:
                entry["probe_error"] = f"{type(err).__name__}: {err}"
        acks = [(r.tokens_read or 0, r.tokens or 0) for r in reads if r.session == name and r.ok]
        entry.update(
            lost_updates(acks, recorded_reads, recorded_tokens, None if listed is None else name in listed)
        )
        sessions[name] = entry
    if load.server.process is None and not load.args.keep_sessions:
        for name in [*names, load.scratch]:
            with contextlib.suppress(OSError):
                http(load.server, "DELETE", f"/v1/sessions/{name}", timeout=30)
    return sessions


def lost_updates(
    acks: list[tuple[int, int]], recorded_reads: int | None, recorded_tokens: int | None, listed: bool | None
) -> dict[str, Any]:
    """Reads of one session acknowledged but missing from it. `acks`: (tokens_read, tokens after) of each
    read answered 200; `recorded_*`: what the session holds at the end (its JSON's sources and tokens, or
    a last read's count; None: unknown); `listed`: whether GET /v1/sessions names it.

    Lost reads are the most of: acknowledged reads less recorded sources; acknowledged tokens less recorded
    tokens, in reads of the mean size; overlapping acknowledgements (reads to one session are serialised,
    so each acknowledged total is at least the one before it plus its own tokens_read: less means two
    reads started from the same memory and one's save replaced the other's); all of them when the
    session is not listed or cannot be read."""
    acked_reads, acked_tokens = len(acks), sum(read for read, _ in acks)
    overlapping, before = 0, 0
    for read, after in sorted(acks, key=lambda ack: ack[1]):
        if after - before < read:
            overlapping += 1
        before = after
    lost_tokens = None if recorded_tokens is None else max(0, acked_tokens - recorded_tokens)
    lost = overlapping
    if recorded_reads is not None:
        lost = max(lost, acked_reads - recorded_reads)
    if lost_tokens:
        lost = max(lost, math.ceil(lost_tokens / (acked_tokens / acked_reads)))
    if listed is False or (recorded_reads is None and recorded_tokens is None):
        lost = acked_reads
    return {
        "acked_reads": acked_reads,
        "acked_tokens": acked_tokens,
        "recorded_reads": recorded_reads,
        "recorded_tokens": recorded_tokens,
        "listed": listed,
        "overlapping_acks": overlapping,
        "lost_tokens": lost_tokens,
        "lost_reads": lost,
    }


# ---- the report ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _median(values: list[float]) -> float | None:
    return percentile(values, 50)


def _stats(values: list[float]) -> dict[str, Any]:
    rounded = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {
        "n": len(values),
        "p50": rounded(percentile(values, 50)),
        "p99": rounded(percentile(values, 99)),
        "mean": rounded(sum(values) / len(values)) if values else None,
        "max": rounded(max(values)) if values else None,
    }


def build_report(
    args: argparse.Namespace,
    server: Server,
    load: Load,
    alone: dict[str, Any],
    elapsed: float,
    stuck: int,
    warmup: float,
    pid: int | None,
    sampler: RssSampler | None,
    alive: dict[str, Any],
    sessions: dict[str, Any],
) -> dict[str, Any]:
    during = [r for r in load.results if r.phase == "load"]
    kinds: dict[str, Any] = {}
    for kind in args.mix:
        mine = [r for r in during if r.kind == kind]
        outcomes = Counter(r.outcome for r in mine)
        entry = {
            "sent": len(mine),
            "ok": sum(r.ok for r in mine),
            "rejected_429": outcomes["rejected"],
            "4xx": outcomes["4xx"],
            "5xx": outcomes["5xx"],
            "exceptions": outcomes["exception"],
            "statuses": dict(sorted(Counter(str(r.status) for r in mine if r.status is not None).items())),
            "per_s": round(len(mine) / elapsed, 3) if elapsed else None,
            "latency_s": _stats([r.latency for r in mine if r.ok]),
        }
        if kind in STREAMED:
            entry["first_text_s"] = _stats([r.ttft for r in mine if r.ok and r.ttft is not None])
        if kind == "drop":
            entry["finished_before_drop"] = sum(1 for r in mine if r.ok and (r.chunks or 0) < args.drop_after)
        kinds[kind] = entry
    every = load.results  # errors count every request the run made: before, in and after the load
    valid = [r for r in every if r.kind != "malformed"]
    malformed_all = [r for r in load.results if r.kind == "malformed"]
    malformed = {}
    for sub in MALFORMED:
        mine = [r for r in malformed_all if r.sub == sub]
        malformed[sub] = {
            "sent": len(mine),
            "answered_4xx": sum(r.outcome == "4xx" for r in mine),
            "rejected_429": sum(r.outcome == "rejected" for r in mine),
            "not_4xx": sum(r.outcome not in ("4xx", "rejected") for r in mine),
            "statuses": dict(sorted(Counter(str(r.status) for r in mine if r.status is not None).items())),
            "example": next(
                (f"{r.status}: {r.message}" for r in mine if r.outcome not in ("4xx", "rejected")), None
            ),
        }
    exceptions = Counter(r.error for r in every if r.outcome == "exception")
    examples: dict[str, str] = {}
    for r in every:
        if r.outcome in ("exception", "5xx") or (r.outcome == "4xx" and r.kind != "malformed"):
            examples.setdefault(f"{r.kind}:{r.error or r.status}", (r.message or "")[:300])
    errors = {
        "requests": len(every),
        "statuses": dict(sorted(Counter(str(r.status) for r in every if r.status is not None).items())),
        "5xx": sum(r.outcome == "5xx" for r in every),
        "stream_error_events": dict(
            Counter(r.error for r in every if (r.error or "").startswith("stream_error:"))
        ),
        "rejected_429": sum(r.outcome == "rejected" for r in every),
        "rejected_without_retry_after": sum(r.status == 429 and not r.retry_after for r in every),
        "unexpected_4xx": sum(r.outcome == "4xx" for r in valid),
        "exceptions": sum(exceptions.values()),
        "exceptions_by_type": dict(exceptions),
        "malformed_not_4xx": sum(m["not_4xx"] for m in malformed.values()),
        "examples": examples,
    }
    timed = [r.latency for r in during if r.kind == "completion" and r.ok]
    p99 = percentile(timed, 99)
    slowdown = p99 / alone["median_s"] if p99 is not None and alone["median_s"] else None
    completion_16 = {
        "alone_median_s": _round(alone["median_s"]),
        "alone_samples_s": alone["samples_s"],
        "under_load_p50_s": _round(percentile(timed, 50)),
        "under_load_p99_s": _round(p99),
        "under_load_n": len(timed),
        "slowdown_p99": _round(slowdown),
        "completion_tokens": alone["completion_tokens"],
    }
    memory = memory_report(sampler, warmup, pid)
    lost = sum(s["lost_reads"] for s in sessions.values())
    report = {
        "config": {
            "url": server.url,
            "started_server": server.process is not None,
            "server_command": _redacted(server.command),
            "model": server.model,
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": warmup,
            "mix": args.mix,
            "new_tokens": NEW_TOKENS,
            "drop_max_tokens": args.drop_max_tokens,
            "max_input_tokens": args.max_input_tokens,
            "request_timeout_s": args.request_timeout,
            "seed": args.seed,
        },
        "elapsed_s": round(elapsed, 2),
        "clients_stuck": stuck,
        "requests": len(during),
        "requests_ok": sum(r.ok for r in during),
        "requests_per_s": round(len(during) / elapsed, 3) if elapsed else None,
        "ok_per_s": round(sum(r.ok for r in during) / elapsed, 3) if elapsed else None,
        "kinds": kinds,
        "malformed": malformed,
        "errors": errors,
        "completion_16": completion_16,
        "sessions": sessions,
        "lost_updates": lost,
        "memory": memory,
        "alive_at_end": alive,
    }
    report["targets"] = evaluate_targets(report, args)
    report["passed"] = all(t["passed"] is not False for t in report["targets"].values())
    return report


def _redacted(command: list[str] | None) -> list[str] | None:
    """The command without its API key."""
    if command is None:
        return None
    return [("***" if i and command[i - 1] == "--api-key" else part) for i, part in enumerate(command)]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def memory_report(sampler: RssSampler | None, warmup: float, pid: int | None) -> dict[str, Any]:
    if sampler is None or not sampler.samples:
        return {
            "pid": pid,
            "measured": False,
            "error": sampler.error if sampler else "no server process known",
        }
    samples = sampler.samples
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    after = next((s for s in samples if s[0] >= warmup), samples[-1])
    later = [s[1] for s in samples if s[0] >= after[0]]
    return {
        "pid": pid,
        "measured": True,
        "samples": len(samples),
        "start_mb": mb(samples[0][1]),
        "after_warmup_mb": mb(after[1]),
        "after_warmup_at_s": round(after[0], 1),
        "max_mb": mb(max(s[1] for s in samples)),
        "end_mb": mb(samples[-1][1]),
        "drift": round(samples[-1][1] / after[1] - 1, 4),
        "max_after_warmup_drift": round(max(later) / after[1] - 1, 4),
        "error": sampler.error,
        "series_mb": [[round(t, 1), mb(b)] for t, b in samples],
    }


def evaluate_targets(report: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each target: its value, threshold and passed (None: could not be measured)."""
    errors, memory = report["errors"], report["memory"]
    slowdown = report["completion_16"]["slowdown_p99"]
    drift = memory.get("drift") if memory.get("measured") else None
    at_most = lambda value, limit: {"value": value, "threshold": limit, "passed": value <= limit}  # noqa: E731
    return {
        "no_5xx": at_most(errors["5xx"], args.max_5xx),
        "no_exceptions": at_most(errors["exceptions"] + report["clients_stuck"], args.max_exceptions),
        "no_unexpected_4xx": at_most(errors["unexpected_4xx"], args.max_unexpected_4xx),
        "no_lost_updates": at_most(report["lost_updates"], args.max_lost_updates),
        "p99_16_tokens_vs_alone": {
            "value": slowdown,
            "threshold": args.max_slowdown,
            "passed": slowdown is not None and slowdown <= args.max_slowdown,
        },
        "memory_flat": {
            "value": drift,
            "threshold": args.max_rss_drift,
            "passed": None if drift is None else abs(drift) <= args.max_rss_drift,
        },
        "malformed_answered_4xx": at_most(errors["malformed_not_4xx"], args.max_malformed_not_4xx),
        "answering_at_end": {
            "value": report["alive_at_end"]["answering"],
            "threshold": True,
            "passed": report["alive_at_end"]["answering"],
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    ms = lambda s: "-" if s is None else f"{s * 1000:,.0f}"  # noqa: E731
    config = report["config"]
    table = Table(
        title=f"hmt serve under load: {config['model']}, {config['clients']} clients, "
        f"{report['elapsed_s']:.0f} s, {report['requests_per_s']} requests/s"
    )
    for column in (
        "kind",
        "sent",
        "ok",
        "429",
        "4xx",
        "5xx",
        "exc",
        "/s",
        "p50 ms",
        "p99 ms",
        "first text p50",
    ):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, k in report["kinds"].items():
        first = k.get("first_text_s", {}).get("p50")
        table.add_row(
            kind,
            str(k["sent"]),
            str(k["ok"]),
            str(k["rejected_429"]),
            str(k["4xx"]),
            str(k["5xx"]),
            str(k["exceptions"]),
            f"{k['per_s']:.2f}",
            ms(k["latency_s"]["p50"]),
            ms(k["latency_s"]["p99"]),
            ms(first),
        )
    console.print(table)
    bad = Table(title="malformed requests (the sweep before the load and those in it)")
    for column in ("request", "sent", "4xx", "429", "not 4xx", "statuses"):
        bad.add_column(column, justify="left" if column in ("request", "statuses") else "right")
    for sub, m in report["malformed"].items():
        style = "red" if m["not_4xx"] else None
        bad.add_row(
            sub,
            str(m["sent"]),
            str(m["answered_4xx"]),
            str(m["rejected_429"]),
            str(m["not_4xx"]),
            ", ".join(f"{s}: {n}" for s, n in m["statuses"].items()),
            style=style,
        )
    console.print(bad)
    errors, c16, memory, alive = (
        report["errors"],
        report["completion_16"],
        report["memory"],
        report["alive_at_end"],
    )
    console.print(
        f"statuses: {errors['statuses']}  429 (rejected): {errors['rejected_429']} "
        f"({errors['rejected_without_retry_after']} without Retry-After)  5xx: {errors['5xx']}  "
        f"exceptions: {errors['exceptions_by_type'] or 0}  stream error events: {errors['stream_error_events'] or 0}"
    )
    for what, message in list(errors["examples"].items())[:8]:
        console.print(f"  [dim]{what}: {message}")
    slowdown = "-" if c16["slowdown_p99"] is None else f"{c16['slowdown_p99']:.1f}"
    console.print(
        f"16-token completion: alone {ms(c16['alone_median_s'])} ms (median of {len(c16['alone_samples_s'])}), "
        f"under load p50 {ms(c16['under_load_p50_s'])} ms, p99 {ms(c16['under_load_p99_s'])} ms "
        f"(n={c16['under_load_n']}): {slowdown}× its time alone"
    )
    sessions = report["sessions"]
    acked = sum(s["acked_reads"] for s in sessions.values())
    unacked = sum(s["unacknowledged_reads"] for s in sessions.values())
    source = {s["source"] for s in sessions.values()}
    console.print(
        f"sessions: {len(sessions)}, {acked} reads acknowledged ({unacked} not), lost updates: "
        f"{report['lost_updates']} (checked by {', '.join(str(s) for s in source)})"
    )
    if memory.get("measured"):
        console.print(
            f"server RSS: start {memory['start_mb']} MiB, after warm-up {memory['after_warmup_mb']} MiB "
            f"(at {memory['after_warmup_at_s']} s), max {memory['max_mb']} MiB, end {memory['end_mb']} MiB, "
            f"drift {memory['drift']:+.1%}"
        )
    else:
        console.print(f"server RSS: not measured ({memory.get('error')})")
    console.print(
        f"at the end: process running {alive['process_running']}, GET /v1/models {alive['models_status']}, "
        f"16-token completion {alive['completion_status']} in {ms(alive['completion_s'])} ms"
    )
    targets = Table(title="targets")
    for column in ("target", "value", "threshold", "result"):
        targets.add_column(column)
    for name, t in report["targets"].items():
        verdict = {True: "[green]PASS", False: "[red]FAIL", None: "[yellow]NOT MEASURED"}[t["passed"]]
        targets.add_row(name, str(t["value"]), str(t["threshold"]), verdict)
    console.print(targets)
    console.print("[green bold]all targets met" if report["passed"] else "[red bold]a target failed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    workdir = Path(tempfile.mkdtemp(prefix="hmt-serve-load-"))
    server: Server | None = None
    try:
        if args.url is not None:
            server = Server(args.url, args.api_key, sessions_dir=args.sessions_dir, pid=args.server_pid)
        else:
            console.print(f"starting hmt serve (log: {workdir / 'server.log'})")
            server = start_server(args, workdir)
        try:
            wait_until_answering(server, args.startup_timeout)
        except RuntimeError as err:
            console.print(f"[red]{err}")
            return 3
        report = run_load(args, server, console)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(report, console)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console.print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
