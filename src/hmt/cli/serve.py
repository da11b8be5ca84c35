"""`hmt serve`: the OpenAI-compatible server (see hmt.server)."""

from __future__ import annotations

import os
from typing import Annotated

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
from hmt.cli.session import SessionsDirOpt, sessions_dir

KEY_VARIABLE = "HMT_API_KEY"


def serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help=f"Require 'Authorization: Bearer KEY'; default ${KEY_VARIABLE}, else none."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens one request may generate.")] = 1024,
    max_input_tokens: Annotated[int, typer.Option(help="Most tokens one request may send.")] = 131072,
    max_request_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 8.0,
    max_queue: Annotated[
        int, typer.Option(help="Most requests running or waiting for the model; more get 429.")
    ] = 32,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for the model (torch.set_num_threads); default: torch's (all cores)."),
    ] = None,
    insecure_no_key: Annotated[
        bool,
        typer.Option(help="Serve without a key on a non-loopback --host (anyone who reaches it can use it)."),
    ] = False,
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of untrained memory parameters.")] = 0,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions) with
    named memories that persist on disk (/v1/sessions/NAME/read, /ask, DELETE)."""
    try:
        import uvicorn

        from hmt.server import Engine, ServerLimits, create_app
    except ImportError as err:
        raise ImportError(
            f"hmt serve needs fastapi and uvicorn ({err}): pip install 'hmt-lm[serve]'"
        ) from None
    from hmt.cli.session import load_reader
    from hmt.sessions import SessionStore

    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )

    if min(max_new_tokens, max_input_tokens, max_queue) < 1 or not 0 < max_request_mb < float("inf"):
        raise ValueError(
            "--max-new-tokens, --max-input-tokens, --max-queue and --max-request-mb must be positive"
        )
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    key = check_key(api_key if api_key is not None else os.environ.get(KEY_VARIABLE), host, insecure_no_key)
    store = SessionStore(sessions_dir(sessions))
    store.check_writable()  # before the model loads, not after a whole read
    removed = store.clean()
    if removed:
        typer.echo(f"removed {len(removed)} files left by interrupted saves in {store.directory}", err=True)
    reader = load_reader(backbone, adapter, reading, dtype, device, seed)
    name = reader.identity["backbone"] + ("+hmt" if reader.adapter is not None else "+hmt-untrained")
    limits = ServerLimits(int(max_request_mb * 2**20), max_new_tokens, max_input_tokens, max_queue)
    engine = Engine(reader.model, reader.tokenizer, reader.identity, store, name, limits)
    app = create_app(engine, key)
    typer.echo(f"serving {name} on http://{host}:{port}/v1 · sessions in {store.directory}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_key(key: str | None, host: str, insecure_no_key: bool) -> str | None:
    """The API key to require: an empty one is refused, and none on a host others can reach is refused
    unless --insecure-no-key says so."""
    if key is not None and not key.strip():
        raise ValueError(
            f"the API key is empty (--api-key or ${KEY_VARIABLE}): give a key, or unset it to serve "
            "without one on 127.0.0.1"
        )
    if key is None and host not in LOOPBACK and not host.startswith("127.") and not insecure_no_key:
        raise ValueError(
            f"--host {host} serves other machines: give --api-key (or ${KEY_VARIABLE}), or pass "
            "--insecure-no-key to serve them without one"
        )
    return key
