"""`hmt serve`: an OpenAI-compatible HTTP server over one HMT model, with named memories (sessions).

Endpoints: GET /v1/models; POST /v1/completions and /v1/chat/completions (streamed over server-sent
events or not; an extra body field `session` continues a saved memory, `keep` saves the exchange into
it); GET /v1/sessions; POST /v1/sessions/{name}/read (a document into a memory) and
/v1/sessions/{name}/ask; DELETE /v1/sessions/{name}. Chat completions and session asks answer through
the ask path (`hmt.ask.ask`: the turn read as its own segment, then again opening the answer's);
completions continue the raw text. Errors are OpenAI-style JSON with a 4xx status, never a traceback.
One model call runs at a time (the others queue, off the event loop); requests to one session are
serialised, so no request sees another's half-written memory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import TextStreamer

from hmt.ask import ask, ask_turn
from hmt.memory import MemoryState
from hmt.sessions import SessionInfo, SessionStore, check_name


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for."""

    max_request_bytes: int = 8 * 2**20
    max_new_tokens: int = 1024
    max_input_tokens: int = 131072


class APIError(Exception):
    """An error answered as OpenAI-style JSON with `status`."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class Engine:
    """The model, its tokenizer and the sessions; runs one model call at a time."""

    def __init__(self, model: Any, tokenizer: Any, identity: dict, store: SessionStore, name: str) -> None:
        self.model, self.tokenizer, self.identity, self.store, self.name = (
            model,
            tokenizer,
            identity,
            store,
            name,
        )
        self.model_lock = threading.Lock()
        self._session_locks: dict[str, asyncio.Lock] = {}

    def session_lock(self, name: str) -> asyncio.Lock:
        return self._session_locks.setdefault(name, asyncio.Lock())

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def load_session(self, name: str | None) -> tuple[MemoryState | None, SessionInfo | None]:
        if name is None:
            return None, None
        try:
            check_name(name)
            return self.store.load(name, self.identity, device=self.model.device)
        except FileNotFoundError as err:
            raise APIError(404, str(err), code="session_not_found") from None
        except ValueError as err:
            raise APIError(409 if "another model" in str(err) else 400, str(err)) from None

    def read(self, ids: torch.Tensor, state: MemoryState | None) -> MemoryState:
        with self.model_lock, torch.no_grad():
            for start in range(0, ids.numel(), 4096):
                state = self.model(ids[None, start : start + 4096], state=state, score=False).state
        return state

    def generate(
        self, ids: torch.Tensor, state: MemoryState | None, settings: dict, stops: list[str],
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, Any, str]:  # fmt: skip
        """Continue the raw text `ids`: (text cut at the first stop, the output, finish reason)."""
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text is not None else None
        with self.model_lock:
            out = self.model.generate(
                ids[None], state=state, tokenizer=self.tokenizer, stop_strings=stops or None,
                streamer=streamer, **settings,
            )  # fmt: skip
        return self._finish(out, settings, stops)

    def ask(
        self, messages: list[dict[str, str]], state: MemoryState | None, settings: dict, stops: list[str],
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, Any, str]:  # fmt: skip
        """Answer `messages` through the ask path (`hmt.ask.ask`); `stops` add to the turn's own.
        (text cut at the first stop, the output, finish reason)."""
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text is not None else None
        turn_stops = list(ask_turn(self.tokenizer, messages).stops)
        with self.model_lock:
            answer = ask(
                self.model, self.tokenizer, messages, state, streamer=streamer, stop_strings=stops, **settings
            )
        return self._finish(answer.output, settings, [*turn_stops, *stops])

    def _finish(self, out: Any, settings: dict, stops: list[str]) -> tuple[str, Any, str]:
        """The text of `out` cut at the first stop (not stripped: what was streamed), and why it ended."""
        text = self.tokenizer.decode(out.sequences[0], skip_special_tokens=True)
        stopped = len(out.sequences[0]) < settings["max_new_tokens"]
        for stop in stops:
            if stop in text:
                text, stopped = text.split(stop)[0], True
        eos = (
            self.model.backbone.generation_config.eos_token_id
            if hasattr(self.model.backbone, "generation_config")
            else None
        )
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        stopped = stopped or (len(out.sequences[0]) > 0 and int(out.sequences[0, -1]) in eos_ids)
        return text, out, "stop" if stopped else "length"


class _CallbackStreamer(TextStreamer):
    """transformers' incremental decoding, handing each finished piece of text to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


# ---- request bodies -----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingBody(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    session: str | None = None  # hmt: continue this saved memory
    keep: bool = False  # hmt: save the exchange into the session


class CompletionBody(SamplingBody):
    prompt: str


class ChatMessage(_Body):
    role: str
    content: str


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)


class ReadBody(_Body):
    text: str
    append: bool = True


class AskBody(_Body):
    question: str
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    keep: bool = False


# ---- the app ------------------------------------------------------------------------------------


def create_app(engine: Engine, api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    app = FastAPI(title="hmt", description="An OpenAI-compatible server over an HMT model with memories.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                   "authentication_error", "invalid_api_key"))  # fmt: skip
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_request_bytes:
            return _error(APIError(413, f"request body over {limits.max_request_bytes:,} bytes"))
        try:
            return await call_next(request)
        except APIError as err:
            return _error(err)

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

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception):
        return _error(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))

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
    async def completions(body: CompletionBody):
        return await _complete(engine, limits, body, "text_completion", prompt=body.prompt)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        messages = [m.model_dump() for m in body.messages]
        return await _complete(engine, limits, body, "chat.completion", messages=messages)

    @app.get("/v1/sessions")
    async def sessions():
        return {"object": "list", "data": engine.store.names()}

    @app.post("/v1/sessions/{name}/read")
    async def read(name: str, body: ReadBody):
        _check_session_name(name)
        if not body.text.strip():
            raise APIError(400, "text is empty: give the document to read")
        ids = engine.encode(body.text)
        _check_input(ids, limits)
        async with engine.session_lock(name):
            state, info = None, SessionInfo(model=engine.identity)
            if engine.store.exists(name):
                if not body.append:
                    raise APIError(409, f"session {name!r} exists: send append=true or delete it first")
                state, info = engine.load_session(name)
            state = await asyncio.to_thread(engine.read, ids, state)
            info.sources.append("read")
            engine.store.save(name, state, info)
        return {"session": name, "tokens_read": int(ids.numel()), "tokens": int(state.tokens.sum()),
                "memories": int(state.num_memories.sum())}  # fmt: skip

    @app.post("/v1/sessions/{name}/ask")
    async def ask(name: str, body: AskBody):
        _check_session_name(name)
        if not body.question.strip():
            raise APIError(400, "question is empty")
        messages = [{"role": "user", "content": body.question}]
        request = ChatBody(messages=[ChatMessage(**m) for m in messages], session=name, keep=body.keep,
                           max_tokens=body.max_tokens, temperature=body.temperature)  # fmt: skip
        reply = await _complete(engine, limits, request, "chat.completion", messages=messages)
        return {"session": name, "answer": reply["choices"][0]["message"]["content"], "usage": reply["usage"]}

    @app.delete("/v1/sessions/{name}")
    async def delete(name: str):
        _check_session_name(name)
        async with engine.session_lock(name):
            try:
                engine.store.delete(name)
            except FileNotFoundError as err:
                raise APIError(404, str(err), code="session_not_found") from None
        return {"session": name, "deleted": True}

    return app


async def _complete(
    engine: Engine, limits: ServerLimits, body: SamplingBody, kind: str, *, prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
):  # fmt: skip
    """A completion of the raw text `prompt`, or an answer to chat `messages` through the ask path, streamed
    or whole, continuing body.session if given."""
    if body.model is not None and body.model != engine.name:
        raise APIError(
            404, f"no model {body.model!r}: this server serves {engine.name!r}", code="model_not_found"
        )
    if body.keep and body.session is None:
        raise APIError(400, "keep saves into a session: give session")
    if body.session is not None:
        _check_session_name(body.session)
    new = body.max_completion_tokens or body.max_tokens or 16
    if new > limits.max_new_tokens:
        raise APIError(400, f"max_tokens {new} is over this server's limit of {limits.max_new_tokens}")
    turn_stops: list[str] = []
    if messages is not None:  # the ask path: the chat turn (read twice), its own stop strings
        try:
            turn = ask_turn(engine.tokenizer, messages)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        prompt, turn_stops = turn.text, list(turn.stops)
    ids = engine.encode(prompt or "")
    if ids.numel() == 0:
        raise APIError(400, "the prompt is empty")
    _check_input(ids, limits)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    settings: dict[str, Any] = {"max_new_tokens": new, "do_sample": body.temperature > 0}
    if body.temperature > 0:
        settings.update(temperature=body.temperature, top_p=body.top_p, top_k=None)
    created, reply_id = (
        int(time.time()),
        f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
    )
    lock = engine.session_lock(body.session) if body.session is not None else None

    async def run(on_text: Callable[[str], None] | None):
        if body.seed is not None:
            torch.manual_seed(body.seed)
        state, info = engine.load_session(body.session)
        if messages is not None:
            answer = await asyncio.to_thread(engine.ask, messages, state, settings, stops, on_text)
        else:
            answer = await asyncio.to_thread(engine.generate, ids, state, settings, stops, on_text)
        text_out, out, finish = answer
        if body.keep:
            engine.store.save(body.session, out.state, info)
        usage = {"prompt_tokens": int(ids.numel()), "completion_tokens": int(out.sequences.shape[1]),
                 "total_tokens": int(ids.numel() + out.sequences.shape[1])}  # fmt: skip
        return text_out, finish, usage

    if not body.stream:
        if lock is not None:
            async with lock:
                text_out, finish, usage = await run(None)
        else:
            text_out, finish, usage = await run(None)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text_out}, "finish_reason": finish}
                  if kind == "chat.completion" else
                  {"index": 0, "text": text_out, "finish_reason": finish, "logprobs": None})  # fmt: skip
        return {"id": reply_id, "object": kind, "created": created, "model": engine.name, "choices": [choice],
                "usage": usage}  # fmt: skip

    if lock is not None and body.session is not None:
        engine.load_session(body.session)  # an unknown session is a 404 before the stream starts
    return StreamingResponse(_stream(run, lock, kind, reply_id, created, engine.name, [*turn_stops, *stops]),
                             media_type="text/event-stream")  # fmt: skip


async def _stream(run, lock, kind, reply_id, created, model_name, stops) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, then [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

    def event(delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if kind == "chat.completion":
            content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        data = {
            "id": reply_id,
            "object": chunk_kind,
            "created": created,
            "model": model_name,
            "choices": [choice],
        }
        return f"data: {json.dumps(data)}\n\n"

    async def produce():
        try:
            if lock is not None:
                async with lock:
                    return await run(lambda text: loop.call_soon_threadsafe(queue.put_nowait, text))
            return await run(lambda text: loop.call_soon_threadsafe(queue.put_nowait, text))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.create_task(produce())
    if kind == "chat.completion":
        yield event(None, first=True)
    total, sent = "", 0
    longest = max((len(s) for s in stops), default=0)
    while (piece := await queue.get()) is not None:
        total += piece
        found = [total.find(s) for s in stops if s in total]
        # Hold back what could still turn out to be the start of a stop string.
        limit = min(found) if found else len(total) - max(longest - 1, 0)
        if limit > sent:
            yield event(total[sent:limit])
            sent = limit
    try:
        text_out, finish, _ = await task
    except APIError as err:
        yield f"data: {json.dumps({'error': _error_body(err)})}\n\n"
        return
    rest = text_out[sent:]
    if rest:
        yield event(rest)
    yield event(None, finish=finish)
    yield "data: [DONE]\n\n"


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "hmt"}


def _check_session_name(name: str) -> None:
    try:
        check_name(name)
    except ValueError as err:
        raise APIError(400, str(err)) from None


def _check_input(ids: torch.Tensor, limits: ServerLimits) -> None:
    if ids.numel() > limits.max_input_tokens:
        raise APIError(
            413, f"input of {ids.numel():,} tokens is over this server's limit of {limits.max_input_tokens:,}"
        )


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {error.get('msg', 'invalid')}"


def _error_body(err: APIError) -> dict:
    return {"message": err.message, "type": err.kind, "code": err.code}


def _error(err: APIError) -> JSONResponse:
    return JSONResponse({"error": _error_body(err)}, status_code=err.status)
