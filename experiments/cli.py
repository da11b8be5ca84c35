"""Running an experiment's typer app as a command: known errors print as one line, as `hmt` does."""

from __future__ import annotations

import os
import sys

import typer

DEBUG_VARIABLE = "HMT_DEBUG"
KNOWN_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, OSError)


def tool(help_text: str) -> typer.Typer:
    """A typer app for one experiment: a single command, no completion, plain tracebacks."""
    return typer.Typer(
        help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )


def run(app: typer.Typer) -> None:
    """Run `app`; a known error becomes `error: ...` on stderr and exit code 1 (HMT_DEBUG=1: traceback)."""
    try:
        app()
    except KNOWN_ERRORS as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        typer.echo(f"(set {DEBUG_VARIABLE}=1 to see the traceback)", err=True)
        sys.exit(1)
