"""`hmt read`, `hmt ask`, `hmt chat`, `hmt generate`: put a long text into a saved memory and use it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DeviceOpt,
    DtypeOpt,
    NumSensoryOpt,
    SegmentLengthOpt,
    SetOpt,
    reading_settings,
)

SESSIONS_VARIABLE = "HMT_SESSIONS_DIR"

SessionsDirOpt = Annotated[
    Path | None,
    typer.Option(help=f"Folder of saved sessions; default ${SESSIONS_VARIABLE}, else ~/.hmt/sessions."),
]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0: greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of this probability.")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: all).")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(help="transformers' repetition penalty (1: none).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of sampling and of untrained memory parameters.")]


@contextmanager
def hold(store: Any, name: str | None) -> Iterator[None]:
    """Hold session `name`'s lock across processes (none: nothing to hold), saying so when another
    process has it and this one waits."""
    if name is None:
        yield
        return
    lock = store.lock(name)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        typer.echo(f"(session {name} is in use by another process: waiting for it)", err=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def sessions_dir(given_dir: Path | None) -> Path:
    if given_dir is not None:
        return given_dir
    return Path(os.environ.get(SESSIONS_VARIABLE) or Path.home() / ".hmt" / "sessions")


def load_reader(backbone: str | None, adapter: Path | None, reading: dict, dtype: str, device: str | None,
                seed: int) -> Any:  # fmt: skip
    """The model that reads and uses sessions (`hmt.loading.LoadedModel`), always with the causal query:
    generation cannot form the paper's, and a memory read with it in pieces equals one read only at
    segment boundaries (on the shipped adapter the two read alike)."""
    from hmt.loading import load_model

    return load_model(backbone, adapter=adapter, settings=reading | {"recall_query": "causal"}, dtype=dtype,
                      device=device, seed=seed)  # fmt: skip


def continue_text(reader: Any, prompt: str, state: Any, settings: dict[str, Any], show: bool):
    """Continue the raw text `prompt` (`hmt generate`), streaming it to stdout if `show`; (text, output).
    Questions and chat turns go through `hmt.ask.ask` instead."""
    from transformers import TextStreamer

    ids = reader.encode(prompt)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: give some text")
    streamer = TextStreamer(reader.tokenizer, skip_prompt=True) if show else None
    out = reader.model.generate(
        ids[None], state=state, tokenizer=reader.tokenizer, streamer=streamer, **settings
    )
    text = reader.tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    return text.strip() or "(no answer)", out


def sampling(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float
) -> dict:
    """Generation settings from the command's options (temperature 0: greedy; `hmt.sampling.Sampling`)."""
    from hmt.sampling import Sampling

    return Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty).generate_kwargs()


def read_command(
    file: Annotated[Path, typer.Argument(help="Text file to read ('-': standard input).")],
    session: Annotated[str, typer.Option(help="Name of the session to read into.")],
    append: Annotated[bool, typer.Option(help="Read after what the session already holds.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the session if it exists.")] = False,
    chunk: Annotated[int, typer.Option(help="Tokens read per call (memory use, not results).")] = 4096,
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Read a text of any length into a saved memory (a session) to ask about it later."""
    import sys

    from rich.console import Console

    from hmt.sessions import SessionStore, check_name

    console = Console(stderr=True)
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    check_name(session)
    if append and overwrite:
        raise ValueError("--append and --overwrite exclude each other: keep the session or replace it")
    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {chunk}")
    store = SessionStore(sessions_dir(sessions))
    if store.exists(session) and not (append or overwrite):
        raise FileExistsError(
            f"session {session!r} exists in {store.directory}: pass --append to read more into it or "
            "--overwrite to replace it"
        )
    store.check_writable()
    if str(file) == "-":
        text = sys.stdin.read()
    elif not file.is_file():
        raise FileNotFoundError(f"{file} is not a file")
    else:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{file} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{file} holds no text to read")
    with console.status("loading the model"):
        reader = load_reader(backbone, adapter, reading, dtype, device, seed)
    with hold(store, session):  # no other process changes the session between its load and this save
        _read_into(store, session, reader, text, str(file), append, chunk, console)


def _read_into(store: Any, session: str, reader: Any, text: str, source: str, append: bool, chunk: int,
               console: Any) -> None:  # fmt: skip
    """Read `text` into `session` (after what it holds, if `append`) with a progress bar, and save it."""
    import time

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from hmt.reading import read_steps
    from hmt.sessions import SessionInfo

    state, info = None, SessionInfo(model=reader.identity)
    if append and store.exists(session):
        state, info = store.load(session, reader.identity, model=reader.model)
        text = "\n\n" + text
    ids = reader.encode(text)
    started = time.perf_counter()
    columns = (TextColumn("reading"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[speed]}"))
    with Progress(*columns, TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("read", total=ids.numel(), speed="")
        for done, after in read_steps(reader.model, ids, state, chunk=chunk):
            state = after
            speed = f"{done / (time.perf_counter() - started):,.0f} tok/s"
            progress.update(task, completed=done, speed=speed)
    seconds = time.perf_counter() - started
    info.sources.append(source)
    store.save(session, state, info)
    console.print(
        f"read {ids.numel():,} tokens in {seconds:.1f} s ({ids.numel() / seconds:,.0f} tok/s) into session "
        f"[bold]{session}[/] ({int(state.tokens.sum()):,} tokens, {int(state.num_memories.sum())} memories) "
        f"in {store.directory}"
    )


def ask_command(
    session: Annotated[str, typer.Argument(help="Session to ask (made by hmt read).")],
    question: Annotated[str, typer.Argument(help="The question.")],
    keep: Annotated[bool, typer.Option(help="Save the question and answer into the session.")] = False,
    max_new_tokens: MaxNewTokensOpt = 48,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Answer a question from a session's memory (unchanged unless --keep). The question is read as its
    own segment (the answer's segment recalls with it as the query), then again opening the answer's."""
    import torch

    from hmt.ask import ask
    from hmt.sessions import SessionStore

    generation = sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    if not question.strip():
        raise ValueError("the question is empty")
    store = SessionStore(sessions_dir(sessions))
    store.info(session)  # an unknown or damaged session is an error before the model loads
    reader = load_reader(backbone, adapter, reading, dtype, device, seed)
    with hold(store, session if keep else None):
        state, info = store.load(session, reader.identity, model=reader.model)
        torch.manual_seed(seed)
        out = ask(reader.model, reader.tokenizer, question, state, **generation)
        typer.echo(out.text or "(no answer)")
        if keep:
            info.sources.append("ask")
            store.save(session, out.state, info)


def chat_command(
    session: Annotated[
        str | None, typer.Argument(help="Session to keep the conversation in (optional).")
    ] = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.1,
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Chat with a memory that lasts: every turn is read into it; with a session, across runs too.
    An empty line, /exit or end of input ends the chat."""
    import torch

    from hmt.sessions import SessionInfo, SessionStore, check_name

    generation = sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    store = SessionStore(sessions_dir(sessions))
    if session is not None:
        check_name(session)
    reader = load_reader(backbone, adapter, reading, dtype, device, seed)
    with hold(store, session):  # the session is this chat's until it ends: no other writer loses a turn
        state, info = None, SessionInfo(model=reader.identity)
        if session is not None and store.exists(session):
            state, info = store.load(session, reader.identity, model=reader.model)
            typer.echo(f"(session {session}: {int(state.tokens.sum()):,} tokens remembered)")
        torch.manual_seed(seed)
        _chat(reader, generation, state, info, store, session)


def _chat(reader: Any, generation: dict, state: Any, info: Any, store: Any, session: str | None) -> None:
    """The chat's turns, each read into `state` (and saved into `session`, if given), until the end."""
    from hmt.ask import ask

    while True:
        try:
            message = input("you> ")
        except EOFError:
            typer.echo("\n(end of input: chat ended)")
            break
        except (RuntimeError, OSError, ValueError):  # stdin closed (no sys.stdin, a closed file), unreadable
            typer.echo("\n(stdin is closed or cannot be read: chat ended)")
            break
        if not message.strip() or message.strip() == "/exit":
            break
        out = ask(reader.model, reader.tokenizer, message, state, **generation)
        state = out.state
        typer.echo(f"hmt> {out.text or '(no answer)'}")
        if session is not None:
            if "chat" not in info.sources:
                info.sources.append("chat")
            store.save(session, state, info)


def generate_command(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    session: Annotated[str | None, typer.Option(help="Continue after this session's memory.")] = None,
    keep: Annotated[bool, typer.Option(help="Save the prompt and continuation into --session.")] = False,
    max_new_tokens: MaxNewTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Continue a text (after a session's memory, with --session)."""
    import torch

    from hmt.sessions import SessionStore

    generation = sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    if keep and session is None:
        raise ValueError("--keep saves into a session: give --session NAME")
    store = SessionStore(sessions_dir(sessions))
    if session is not None:
        store.info(session)  # before the model loads
    reader = load_reader(backbone, adapter, reading, dtype, device, seed)
    with hold(store, session if keep else None):
        state, info = None, None
        if session is not None:
            state, info = store.load(session, reader.identity, model=reader.model)
        torch.manual_seed(seed)
        typer.echo(prompt, nl=False)
        _, out = continue_text(reader, prompt, state, generation, show=True)
        typer.echo()
        if keep:
            info.sources.append("generate")
            store.save(session, out.state, info)
