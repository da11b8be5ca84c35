"""`hmt serve`: an OpenAI-compatible HTTP server over one HMT model, with named memories (sessions).

Endpoints: GET /v1/models; POST /v1/completions and /v1/chat/completions (streamed over server-sent
events or not; an extra body field `session` continues a saved memory, `keep` saves the exchange into
it); GET /v1/sessions; POST /v1/sessions/{name}/read (a document into a memory) and
/v1/sessions/{name}/ask; DELETE /v1/sessions/{name}. Chat completions and session asks answer through
the ask path (`hmt.ask.ask`: the turn read as its own segment, then again opening the answer's);
completions continue the raw text.

Under load and attack: the model runs one job at a time on its own thread, behind a bounded queue (429
with Retry-After when full); tokenising happens off the event loop; the body limit holds while a body
streams in (chunked or not); a client that leaves stops its work within a token (nothing it asked to
keep is saved); an error inside a stream arrives as an error event and `[DONE]`; every bad value is a
4xx; errors name sessions, never the server's folders. Changes to a session hold its lock across
processes (`SessionStore.lock`), so `hmt read --append` beside the server loses nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import TextStreamer

from hmt.ask import ask_turn, encode
from hmt.batching import Batch, Row
from hmt.memory import MemoryState
from hmt.reading import read_steps
from hmt.sampling import Sampling
from hmt.sessions import ModelMismatch, SessionInfo, SessionStore, check_name

log = logging.getLogger("hmt.server")
READ_CHUNK = 256  # tokens (rounded to whole segments) read per model call: decoding steps run between
READ_SHARE = 0.25  # the most of the model's time documents being read take while answers are decoded


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how many may wait for the model."""

    max_request_bytes: int = 8 * 2**20
    max_new_tokens: int = 1024
    max_input_tokens: int = 131072
    max_queue: int = 32  # requests running or waiting for the model; more get 429


class APIError(Exception):
    """An error answered as OpenAI-style JSON with `status`."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
        headers: dict[str, str] | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers or {}


class Cancelled(Exception):
    """The client left: its work stopped and nothing it asked to keep was saved."""


@dataclass
class Job:
    """One request's work for the model thread; `cancel` is set when its client leaves."""

    cancel: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None  # streamed text, called from the model thread


@dataclass
class Prompt:
    """A generation ready to be read: the row, the ids to read before it decodes, the memory before
    them, and whether they are a chat turn (the ask path reads it first as its own segment)."""

    row: Row
    ids: torch.Tensor
    state: MemoryState | None
    turn: bool


@dataclass
class _Work:
    """What the model thread does for one request: `exclusive` runs alone (a document read); a
    generation is `prepare`d (its session loaded), its prompt read together with those of the requests
    that arrived with it, and it joins the batch; `complete` runs when its row leaves (the answer, saved
    if kept)."""

    future: Future
    exclusive: Callable[[], Any] | None = None
    prepare: Callable[[], Prompt] | None = None
    complete: Callable[[Row], Any] | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    """The model, its tokenizer and the sessions. One thread runs the model: it decodes every request
    being answered together (`hmt.batching.Batch`: rows join between steps and leave when done), and
    runs document reads between steps; at most `limits.max_queue` requests wait or run."""

    def __init__(
        self, model: Any, tokenizer: Any, identity: dict, store: SessionStore, name: str,
        limits: ServerLimits | None = None,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer, self.identity, self.store, self.name = (
            model, tokenizer, identity, store, name,
        )  # fmt: skip
        self.limits = limits or ServerLimits()
        self._inbox: queue.Queue[_Work] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._queued = 0
        self._seconds_per_job = 1.0  # a running mean, for Retry-After
        self._read_seconds = self._decode_seconds = 0.0  # time shares while both run
        self._session_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        eos = getattr(getattr(model.backbone, "generation_config", None), "eos_token_id", None)
        self._eos = {eos} if isinstance(eos, int) else set(eos or [])

    # ---- admission and locks (event loop) --------------------------------------------------------

    def check_room(self) -> None:
        """429 with Retry-After when the model's queue is full."""
        if self._queued >= self.limits.max_queue:
            wait = max(1, round(self._seconds_per_job * self._queued / max(self.limits.max_queue, 1)))
            raise APIError(
                429, f"the server is busy ({self._queued} requests queued): retry in {wait} s",
                "rate_limit_error", "server_busy", headers={"Retry-After": str(wait)},
            )  # fmt: skip

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A place in the model's queue, or 429 with Retry-After when the queue is full."""
        self.check_room()
        self._queued += 1
        try:
            yield
        finally:
            self._queued -= 1

    @asynccontextmanager
    async def session(self, name: str | None, write: bool) -> AsyncIterator[None]:
        """Requests to one session in turn; a writer also holds the session's lock across processes."""
        if name is None:
            yield
            return
        lock = self._session_locks.get(name)
        if lock is None:
            lock = self._session_locks[name] = asyncio.Lock()
        async with lock:
            if not write:
                yield
                return
            file_lock = self.store.lock(name)
            while True:
                try:
                    file_lock.acquire(timeout=0)
                    break
                except TimeoutError:  # another process (hmt read --append) is changing it
                    await asyncio.sleep(0.05)
            try:
                yield
            finally:
                file_lock.release()

    async def run_alone(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the model's thread, between two decoding steps."""
        return await self._submit(_Work(Future(), exclusive=work))

    async def run_generation(self, prepare: Callable[[], Prompt], complete: Callable[[Row], Any]) -> Any:
        """Read a prompt (from `prepare`), decode it in the batch, and return `complete(row)` when done."""
        return await self._submit(_Work(Future(), prepare=prepare, complete=complete))

    async def _submit(self, work: _Work) -> Any:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve_model, name="hmt-model", daemon=True)
            self._thread.start()
        self._inbox.put(work)
        return await asyncio.wrap_future(work.future)

    # ---- the model thread ------------------------------------------------------------------------

    def _serve_model(self) -> None:
        """Take work as it comes; decode the batch a step at a time while it has rows, and advance each
        document being read by a chunk between steps."""
        batch, owners, reading = Batch(self.model, self.tokenizer), {}, []
        while True:
            arrived = [self._inbox.get()] if not (batch.rows or reading) else []
            while True:
                try:
                    arrived.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for work in arrived:
                if work.exclusive is not None:
                    self._settle(work, lambda work=work: self._begin(work, reading))
            started = time.perf_counter()
            self._join([w for w in arrived if w.prepare is not None], batch, owners)
            self._decode_seconds += time.perf_counter() - started
            for work, steps in list(reading) if self._reads_may_run(batch) else []:
                try:
                    started = time.perf_counter()
                    next(steps)
                    self._read_seconds += time.perf_counter() - started
                except StopIteration as done:
                    reading.remove((work, steps))
                    self._settle(work, lambda value=done.value: value)
                except Exception as err:  # handed to the request that caused it
                    reading.remove((work, steps))
                    self._settle(work, lambda err=err: _raise(err))
            if not batch.rows:
                continue
            try:
                started = time.perf_counter()
                finished = batch.step()
                self._decode_seconds += time.perf_counter() - started
            except Exception as err:  # a failed step fails the rows in it
                for row in batch.rows:
                    owners.pop(id(row)).future.set_exception(err)
                batch = Batch(self.model, self.tokenizer)
                continue
            for row in finished:
                work = owners.pop(id(row))
                self._settle(work, lambda work=work, row=row: work.complete(row))

    def _join(self, works: list[_Work], batch: Batch, owners: dict) -> None:
        """Read the prompts of the generations that arrived together in one forward pass (two for chat
        turns: the ask path), and let their rows join the batch."""
        prompts = []
        for work in works:
            try:
                prompts.append((work, work.prepare()))
            except Exception as err:  # handed to the request that caused it
                work.future.set_exception(err)
        if not prompts:
            return
        try:
            states = [p.state for _, p in prompts]
            turns = [i for i, (_, p) in enumerate(prompts) if p.turn]
            if turns:  # the ask path: the turn first as its own segment
                read = batch.start_many([prompts[i][1].ids for i in turns], [states[i] for i in turns], True)
                for i, state in zip(turns, read, strict=True):
                    states[i] = state
            states = batch.start_many([p.ids for _, p in prompts], states)
        except Exception as err:  # a failed read fails the requests in it
            for work, _ in prompts:
                work.future.set_exception(err)
            return
        for (work, prompt), state in zip(prompts, states, strict=True):
            try:
                batch.add(prompt.row, state)
                owners[id(prompt.row)] = work
            except Exception as err:  # handed to the request that caused it
                work.future.set_exception(err)

    def _reads_may_run(self, batch: Batch) -> bool:
        """Documents being read get at most a quarter of the model's time while answers are being read
        and decoded (`READ_SHARE`): answers are interactive, reads are bulk work."""
        if not batch.rows:
            self._read_seconds = self._decode_seconds = 0.0
            return True
        return self._read_seconds * (1 - READ_SHARE) <= self._decode_seconds * READ_SHARE

    def _begin(self, work: _Work, reading: list) -> Any:
        """Run exclusive work; one that is a generator goes on a step at a time (`_PENDING`)."""
        result = work.exclusive()
        if inspect.isgenerator(result):
            reading.append((work, result))
            return _PENDING
        return result

    def _settle(self, work: _Work, run: Callable[[], Any]) -> None:
        try:
            result = run()
            if result is _PENDING:
                return
            work.future.set_result(result)
        except Exception as err:  # handed to the request that caused it
            work.future.set_exception(err)
        seconds = time.perf_counter() - work.queued_at
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds

    # ---- work done on the model thread -----------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        return encode(self.tokenizer, text, self.model.device)

    def load_session(self, name: str | None) -> tuple[MemoryState | None, SessionInfo | None]:
        """A session's memory, checked against the model; errors name the session, not the folder."""
        if name is None:
            return None, None
        try:
            return self.store.load(name, self.identity, model=self.model)
        except FileNotFoundError:
            raise APIError(404, f"no session {name!r}: create it with POST /v1/sessions/{name}/read",
                           code="session_not_found") from None  # fmt: skip
        except ModelMismatch as err:
            raise APIError(409, f"session {name!r} was made with another model (differs in "
                           f"{', '.join(err.fields)}): read the text into a new session") from None  # fmt: skip
        except ValueError as err:  # damaged records and memories: the message names the session only
            raise APIError(409, str(err), code="session_unusable") from None

    def read(self, ids: torch.Tensor, state: MemoryState | None, job: Job) -> MemoryState:
        """Read `ids` (1-D) after `state`, a chunk per model call, stopping if the client leaves."""
        reading = self.read_steps(ids, state, job)
        while True:
            try:
                next(reading)
            except StopIteration as done:
                return done.value

    def read_steps(
        self, ids: torch.Tensor, state: MemoryState | None, job: Job
    ) -> Generator[None, None, MemoryState]:
        """`read` a chunk (whole segments: the same memory as one call) per step of the generator, so
        the model thread decodes between chunks; returns the state."""
        chunk = _whole_segments(READ_CHUNK, self.model.config.segment_length) or READ_CHUNK
        if job.cancel.is_set():
            raise Cancelled
        for done, after in read_steps(self.model, ids, state, chunk=chunk):
            state = after
            if done < ids.numel():
                yield
                if job.cancel.is_set():
                    raise Cancelled
        return state

    def finish(self, row: Row, stops: list[str]) -> tuple[str, str]:
        """The row's text cut at the first stop (not stripped: what was streamed), and why it ended."""
        if row.finish == "cancelled":
            raise Cancelled
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stopped = row.finish == "stop"
        for stop in stops:
            if stop in text:
                text, stopped = text.split(stop)[0], True
        return text, "stop" if stopped else "length"


class _CallbackStreamer(TextStreamer):
    """transformers' incremental decoding, handing each finished piece of text to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


_PENDING = object()  # exclusive work that goes on between decoding steps


def _raise(err: Exception) -> Any:
    raise err


def _whole_segments(tokens: int, segment_length: int) -> int:
    """The most tokens, at most `tokens`, in whole multiples of the read chunk and of the segment."""
    step = segment_length * max(1, READ_CHUNK // segment_length)
    return (max(tokens, 0) // step) * step


# ---- request bodies -----------------------------------------------------------------------------

Temperature = Annotated[float, Strict(), Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Strict(), Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
NewTokens = Annotated[int, Strict(), Field(ge=1)]
Seed = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingBody(_Body):
    model: StrictStr | None = None
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    session: StrictStr | None = None  # hmt: continue this saved memory
    keep: StrictBool = False  # hmt: save the exchange into the session
    # Accepted at their neutral values only (anything else is a 400, never silently ignored):
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Any] | None = None
    suffix: StrictStr | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionBody(SamplingBody):
    prompt: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        """The content as text (a list of parts: its text parts joined; other parts are a 400)."""
        if isinstance(self.content, str):
            return self.content
        if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in self.content):
            raise APIError(400, "messages: only text content parts are supported ({'type': 'text', ...})")
        return "".join(p["text"] for p in self.content)


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)


class ReadBody(_Body):
    text: StrictStr
    append: StrictBool = True


class AskBody(_Body):
    question: StrictStr
    max_tokens: NewTokens = 64
    temperature: Temperature = 0.0
    keep: StrictBool = False


# ---- the app ------------------------------------------------------------------------------------


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `engine` (its limits), requiring `api_key` unless None."""
    limits = engine.limits
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    app = FastAPI(title="hmt", description="An OpenAI-compatible server over an HMT model with memories.")

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        problems = "; ".join(_describe(e) for e in err.errors())
        return _error(APIError(400, f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return _error(
            APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)
        )

    @app.exception_handler(Cancelled)
    async def client_left(_request: Request, _err: Cancelled):
        return _error(APIError(499, "the client closed the request", code="client_closed_request"))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception):
        log.error("internal error", exc_info=err)
        return _error(_internal())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != engine.name:
            raise APIError(
                404, f"no model {name!r}: this server serves {engine.name!r}", code="model_not_found"
            )
        return _model_card(engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await _complete(engine, limits, request, body, "text_completion", prompt=body.prompt)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await _complete(engine, limits, request, body, "chat.completion", messages=messages)

    @app.get("/v1/sessions")
    async def sessions():
        return {"object": "list", "data": engine.store.names()}

    @app.post("/v1/sessions/{name}/read")
    async def read(name: str, body: ReadBody, request: Request):
        _check_session_name(name)
        if not body.text.strip():
            raise APIError(400, "text is empty: give the document to read")
        _check_text(body.text, "text")
        ids = await asyncio.to_thread(engine.encode, body.text)
        _check_input(ids, limits)
        job = Job()

        def work() -> Generator[None, None, MemoryState]:
            state, info = None, SessionInfo(model=engine.identity)
            if engine.store.exists(name):
                if not body.append:
                    raise APIError(409, f"session {name!r} exists: send append=true or delete it first")
                state, info = engine.load_session(name)
            state = yield from engine.read_steps(ids, state, job)
            info.sources.append("read")
            engine.store.save(name, state, info)
            return state

        async with engine.admitted(), engine.session(name, write=True), _watching(request, job):
            state = await engine.run_alone(work)
        return {"session": name, "tokens_read": int(ids.numel()), "tokens": int(state.tokens.sum()),
                "memories": int(state.num_memories.sum())}  # fmt: skip

    @app.post("/v1/sessions/{name}/ask")
    async def ask_session(name: str, body: AskBody, request: Request):
        _check_session_name(name)
        if not body.question.strip():
            raise APIError(400, "question is empty")
        messages = [{"role": "user", "content": body.question}]
        chat_body = ChatBody(messages=[ChatMessage(**m) for m in messages], session=name, keep=body.keep,
                             max_tokens=body.max_tokens, temperature=body.temperature)  # fmt: skip
        reply = await _complete(engine, limits, request, chat_body, "chat.completion", messages=messages)
        return {"session": name, "answer": reply["choices"][0]["message"]["content"], "usage": reply["usage"]}

    @app.delete("/v1/sessions/{name}")
    async def delete(name: str):
        _check_session_name(name)
        async with engine.session(name, write=True):
            try:
                engine.store.delete(name)
            except FileNotFoundError:
                raise APIError(404, f"no session {name!r}", code="session_not_found") from None
        return {"session": name, "deleted": True}

    return _Guard(app, api_key, limits.max_request_bytes)  # type: ignore[return-value]


class _Guard:
    """ASGI middleware in front of the app: the API key (compared in constant time) and the body limit,
    enforced while the body streams in, whatever its framing (Content-Length or chunked)."""

    def __init__(self, app: FastAPI, api_key: str | None, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    def __getattr__(self, name: str) -> Any:  # the FastAPI app's own attributes (routes, state, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             "authentication_error", "invalid_api_key")  # fmt: skip
            return await _error(error)(scope, receive, send)
        too_big = APIError(413, f"request body over {self.max_bytes:,} bytes")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(too_big)(scope, receive, send)
        pieces, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            pieces.append(message.get("body", b""))
            size += len(pieces[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _error(too_big)(scope, receive, send)
        body, sent = b"".join(pieces), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to leave

        return await self.app(scope, replay, send)


@asynccontextmanager
async def _watching(request: Request, job: Job) -> AsyncIterator[None]:
    """While the block runs, watch for the client leaving and cancel `job` when it does."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        job.cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def _complete(
    engine: Engine, limits: ServerLimits, request: Request, body: SamplingBody, kind: str, *,
    prompt: str | None = None, messages: list[dict[str, str]] | None = None,
):  # fmt: skip
    """A completion of the raw text `prompt`, or an answer to chat `messages` through the ask path, streamed
    or whole, continuing body.session if given."""
    _check_sampling(body, engine, limits)
    if body.session is not None:
        _check_session_name(body.session)
    new = body.max_completion_tokens or body.max_tokens or 16
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    for text in [prompt or "", *stops, *(m["content"] for m in messages or [])]:
        _check_text(text, "the request's text")
    ids, turn_stops = await asyncio.to_thread(_prepare, engine, prompt, messages)
    _check_input(ids, limits)
    settings = Sampling(max_new_tokens=new, temperature=body.temperature, top_p=body.top_p).generate_kwargs()
    created, reply_id = (
        int(time.time()),
        f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
    )
    job = Job()
    all_stops = [*turn_stops, *stops]
    info_of: dict[str, SessionInfo | None] = {}

    def prepare() -> Prompt:
        if job.cancel.is_set():  # the client left while this waited in the queue
            raise Cancelled
        state, info_of["info"] = engine.load_session(body.session)
        prompt_ids = ids
        if messages is None:  # a long raw prompt: all but its last chunk read first, a chunk at a time
            head = _whole_segments(ids.numel() - 1, engine.model.config.segment_length)
            if head > 0:
                state, prompt_ids = engine.read(ids[:head], state, job), ids[head:]
        streamer = _CallbackStreamer(engine.tokenizer, job.on_text) if job.on_text is not None else None
        row = Row(prompt_ids=prompt_ids, settings=settings, stop_strings=tuple(all_stops), seed=body.seed,
                  streamer=streamer, cancel=job.cancel)  # fmt: skip
        return Prompt(row, prompt_ids, state, turn=messages is not None)

    def complete(row: Row) -> tuple[str, str, dict]:
        text_out, finish = engine.finish(row, all_stops)
        if body.keep:
            engine.store.save(body.session, row.state, info_of["info"])
        usage = {"prompt_tokens": int(ids.numel()), "completion_tokens": len(row.tokens),
                 "total_tokens": int(ids.numel()) + len(row.tokens)}  # fmt: skip
        return text_out, finish, usage

    async def run() -> tuple[str, str, dict]:
        async with engine.admitted(), engine.session(body.session, write=body.keep):
            return await engine.run_generation(prepare, complete)

    if not body.stream:
        async with _watching(request, job):
            text_out, finish, usage = await run()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text_out}, "finish_reason": finish}
                  if kind == "chat.completion" else
                  {"index": 0, "text": text_out, "finish_reason": finish, "logprobs": None})  # fmt: skip
        return {"id": reply_id, "object": kind, "created": created, "model": engine.name, "choices": [choice],
                "usage": usage}  # fmt: skip

    if body.session is not None:  # an unknown or unusable session is an error before the stream starts
        await asyncio.to_thread(engine.load_session, body.session)
    engine.check_room()  # a full queue is a 429 before the stream starts
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = _Events(kind, reply_id, created, engine.name, include_usage)
    return StreamingResponse(_stream(run, job, events, all_stops), media_type="text/event-stream")


def _prepare(
    engine: Engine, prompt: str | None, messages: list[dict[str, str]] | None
) -> tuple[torch.Tensor, list[str]]:
    """The ids to read (the raw prompt, or the chat turn the ask path reads) and the turn's stops."""
    turn_stops: list[str] = []
    if messages is not None:
        try:
            turn = ask_turn(engine.tokenizer, messages)
        except Exception as err:  # a template that refuses the messages (roles, order): the client's error
            raise APIError(400, f"messages: {err}") from None
        prompt, turn_stops = turn.text, list(turn.stops)
    ids = engine.encode(prompt or "")
    if ids.numel() == 0:
        raise APIError(400, "the prompt is empty")
    return ids, turn_stops


@dataclass
class _Events:
    """Server-sent events in OpenAI's chunk format."""

    kind: str
    reply_id: str
    created: int
    model_name: str
    include_usage: bool

    def chunk(self, delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if self.kind == "chat.completion":
            content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return self._event([choice])

    def usage(self, usage: dict) -> str:
        return self._event([], usage=usage)

    def _event(self, choices: list, **extra: Any) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        data = {"id": self.reply_id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"


async def _stream(run, job: Job, events: _Events, stops: list[str]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, [DONE]; an error inside the
    stream is an error event, then [DONE]. A client that leaves cancels the job."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)

    async def produce():
        try:
            return await run()
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.create_task(produce())
    task.add_done_callback(_consume)
    finished = False
    try:
        if events.kind == "chat.completion":
            yield events.chunk(None, first=True)
        total, sent = "", 0
        longest = max((len(s) for s in stops), default=0)
        while (piece := await queue.get()) is not None:
            total += piece
            found = [total.find(s) for s in stops if s in total]
            # Hold back what could still turn out to be the start of a stop string.
            limit = min(found) if found else len(total) - max(longest - 1, 0)
            if limit > sent:
                yield events.chunk(total[sent:limit])
                sent = limit
        try:
            text_out, finish, usage = await task
        except APIError as err:
            yield f"data: {json.dumps({'error': _error_body(err)})}\n\n"
        except Exception as err:
            log.error("internal error in a stream", exc_info=err)
            yield f"data: {json.dumps({'error': _error_body(_internal())})}\n\n"
        else:
            if text_out[sent:]:
                yield events.chunk(text_out[sent:])
            yield events.chunk(None, finish=finish)
            if events.include_usage:
                yield events.usage(usage)
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # the client left (the generator was cancelled or closed)
            job.cancel.set()


def _consume(task: asyncio.Task) -> None:
    """Retrieve a background task's exception (a cancelled job's), so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "hmt"}


def _check_sampling(body: SamplingBody, engine: Engine, limits: ServerLimits) -> None:
    """Refuse (400) what this server does not do, rather than ignore it."""
    if body.model is not None and body.model != engine.name:
        raise APIError(
            404, f"no model {body.model!r}: this server serves {engine.name!r}", code="model_not_found"
        )
    if body.keep and body.session is None:
        raise APIError(400, "keep saves into a session: give session")
    new = body.max_completion_tokens or body.max_tokens or 16
    if new > limits.max_new_tokens:
        raise APIError(400, f"max_tokens {new} is over this server's limit of {limits.max_new_tokens}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: up to 4 non-empty strings")
    unsupported = {
        "n": body.n not in (None, 1),
        "best_of": body.best_of not in (None, 1),
        "logprobs": body.logprobs not in (None, False, 0) or body.top_logprobs not in (None, 0),
        "echo": bool(body.echo),
        "presence_penalty": body.presence_penalty not in (None, 0),
        "frequency_penalty": body.frequency_penalty not in (None, 0),
        "logit_bias": bool(body.logit_bias),
        "suffix": bool(body.suffix),
        "tools": bool(body.tools or body.functions) or body.tool_choice not in (None, "none", "auto"),
        "response_format": body.response_format not in (None, {"type": "text"}),
    }
    refused = [name for name, asked in unsupported.items() if asked]
    if refused:
        raise APIError(
            400, f"not supported by this server: {', '.join(refused)} (one greedy or sampled choice of text; "
            "send n=1 and leave the others out)", code="unsupported_parameter",
        )  # fmt: skip


def _check_session_name(name: str) -> None:
    try:
        check_name(name)
    except ValueError as err:
        raise APIError(400, str(err)) from None


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{what} is not valid Unicode (a lone surrogate?): send UTF-8 text") from None


def _check_input(ids: torch.Tensor, limits: ServerLimits) -> None:
    if ids.numel() > limits.max_input_tokens:
        raise APIError(
            413, f"input of {ids.numel():,} tokens is over this server's limit of {limits.max_input_tokens:,}"
        )


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {error.get('msg', 'invalid')}"


def _internal() -> APIError:
    return APIError(500, "internal error (the server logged it)", "server_error")


def _error_body(err: APIError) -> dict:
    return {"message": err.message, "type": err.kind, "code": err.code}


def _error(err: APIError) -> JSONResponse:
    return JSONResponse({"error": _error_body(err)}, status_code=err.status, headers=err.headers)
