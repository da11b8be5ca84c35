"""`hmt serve`: the OpenAI-compatible server (see hmt.server)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    DeviceOpt,
    DtypeOpt,
    NumSensoryOpt,
    SegmentLengthOpt,
    given,
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
    sessions: SessionsDirOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
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
    from hmt.cli.session import Reader
    from hmt.sessions import SessionStore

    if min(max_new_tokens, max_input_tokens) < 1 or max_request_mb <= 0:
        raise ValueError("--max-new-tokens, --max-input-tokens and --max-request-mb must be positive")
    reader = Reader(
        backbone, adapter, given(segment_length=segment_length, num_sensory=num_sensory), dtype, device, seed
    )
    store = SessionStore(sessions_dir(sessions))
    name = reader.identity["backbone"] + ("+hmt" if reader.adapter is not None else "+hmt-untrained")
    engine = Engine(reader.model, reader.tokenizer, reader.identity, store, name)
    limits = ServerLimits(int(max_request_mb * 2**20), max_new_tokens, max_input_tokens)
    app = create_app(engine, api_key or os.environ.get(KEY_VARIABLE) or None, limits)
    typer.echo(f"serving {name} on http://{host}:{port}/v1 · sessions in {store.directory}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
